"""Schedules stage of benchmarks/run.py: SEAP task experts at 50% under three layer schedules.

- "SEAP (task experts)" (the accuracy stage's row): SEAP's default logistic, k = 1.2, x0 = 0.3,
  first and last 2 layers dense;
- "SEAP uniform (task experts)": every layer pruned alike (no dense layers, DESIGN 2.3 UL);
- "SEAP fitted (task experts)": the logistic with (k, x0) fitted by `seap analyze sensitivity`
  with its defaults (results/<model>/schedule/sensitivity.json, computed here once and reused).
Same calibration statistics, scores, items and perplexity subsets as the accuracy stage.
"""

from __future__ import annotations

import gc
import logging
import time

from common import finished, read_result, paired_delta, RESULTS, plan_for, slug, stats_for, write, eval_config

log = logging.getLogger("benchmarks.schedules")
ROWS = ("SEAP (task experts)", "SEAP uniform (task experts)", "SEAP fitted (task experts)")
RATIO = 0.5


def _schedule(plan) -> dict | None:
    """The measured schedule a plan was built with, as recorded."""
    sch = plan.meta.prune_config.allocation.schedule
    return None if sch is None else sch.to_dict()


def schedules(models: list[str], limits: dict[str, int]) -> None:
    from seap.evaluation.runner import evaluate_plan
    from seap.model.loading import load_model

    for model_name in models:
        lm = load_model(model_name)
        stats = None
        for row in ROWS[1:]:
            path = RESULTS / model_name / f"{slug(row, RATIO)}.json"
            cfg = eval_config(model_name, limits[model_name])
            if finished(path, cfg.limit):
                continue
            stats = stats or stats_for(lm, model_name)
            t0 = time.time()
            if row.startswith("SEAP fitted"):
                plan = plan_for(lm, stats, "seap-paper", RATIO, "task", {"schedule": "fitted"})
            else:
                plan = plan_for(lm, stats, "seap-paper", RATIO, "task", {"allocation": "uniform"})
            rep = evaluate_plan(lm, plan, cfg, experts="task", label=f"{row} {int(RATIO * 100)}%")
            data = rep.to_dict()
            data.update(row=row, ratio=RATIO, model=model_name, seconds=round(time.time() - t0, 1),
                        eval_config=cfg.to_dict(), widths=plan.experts[plan.meta.tasks[0]].widths(),
                        schedule=_schedule(plan))
            write(path, data)
            log.info("%s %s: average %.4f in %.0fs", model_name, row, rep.average[0], time.time() - t0)
            gc.collect()
        del lm
        gc.collect()


def schedules_section(model: str, rows: list[dict]) -> str:
    """RESULTS.md: the three schedules side by side at 50%, with paired differences (same items)."""

    at = {r["row"]: r for r in rows if r["ratio"] == RATIO and r["row"] in ROWS}
    dense = next((r for r in rows if r["row"] == "dense"), None)
    if len(at) < 2 or dense is None:
        return ""
    data = read_result(RESULTS / model / "schedule" / "sensitivity.json")
    fit = dict(data["schedule"], r2=data["fits"][data["schedule"]["metric"]]["r2"]) if data else None
    text = (f"\nLayer schedules at {int(100 * RATIO)}% (`python benchmarks/run.py --stage schedules`; SEAP task "
            "experts, same statistics and items; every task expert's widths follow the schedule)")
    text += (f"; fitted by `seap analyze sensitivity` (defaults: {fit['metric']} damage at ratios "
             f"{', '.join(f'{r:g}' for r in fit['ratios'])}, layers {fit['protect_first']} first / "
             f"{fit['protect_last']} last kept dense): k = {fit['k']:.3f}, x0 = {fit['x0']:.3f}, R² of the fit "
             f"{fit['r2']:.2f} (default logistic: k = 1.2, x0 = 0.3; pictures in docs/analyze/{model}):\n\n"
             if fit else ":\n\n")
    text += ("| schedule | items per task | average ± s.e. | Δ vs dense ± paired s.e. | Δ vs default logistic ± "
             "paired s.e. (common items) | token ppl |\n|---|---|---|---|---|---|\n")
    base = at.get(ROWS[0])
    for name in ROWS:
        r = at.get(name)
        if r is None:
            continue
        dd = "{:+.1f} ± {:.1f}".format(*(100 * x for x in paired_delta(r, dense)))
        db = "—" if r is base or base is None else "{:+.2f} ± {:.2f}".format(*(100 * x for x in paired_delta(r, base)))
        ppl = (r.get("token_perplexity") or {}).get("perplexity")
        label = {ROWS[0]: "logistic (default; 2 + 2 layers dense)", ROWS[1]: "uniform (every layer pruned alike)",
                 ROWS[2]: "fitted logistic (2 + 2 layers dense)"}[name]
        items = max(len(v) for v in r["items"].values())
        text += (f"| {label} | {items} | {100 * r['average']['value']:.1f} ± {100 * r['average']['stderr']:.1f} | {dd} | {db} | "
                 f"{f'{ppl:.1f}' if ppl else '—'} |\n")
    return text

"""Routing stage of benchmarks/run.py: the router on held-out prompts, and routed vs oracle accuracy.

For each model, ratio and task-expert plan: a router fitted on the train splits of the six tasks
(evaluated once on their validation splits, results/<model>/router.json), then the task suite with
the router choosing every item's expert. Two plans, the same as their oracle rows: the paper's recipe
(row "SEAP (routed)", oracle "SEAP (task experts)") and seap's default, with reconstruction (row
"SEAP (routed, default)", oracle "SEAP (task experts, default)"). A router is fitted for each plan:
it records the experts' fingerprints and refuses any other plan.
"""

from __future__ import annotations

import gc
import logging
import time

from common import finished, DATA, RESULTS, plan_for, slug, stats_for, unknown_pairs, write, eval_config

log = logging.getLogger("benchmarks.routing")
# (routed row, its oracle row, method, extra PruneConfig settings): the oracle rows' own plans
ROUTED_ROWS = (
    ("SEAP (routed)", "SEAP (task experts)", "seap-paper", {}),
    ("SEAP (routed, default)", "SEAP (task experts, default)", "seap", {"multiple": None}),
)
def _unknown_prompts() -> dict[str, list[str]]:
    """Prompts of kinds the router never saw: GSM8K questions and XSum articles."""
    return {kind: [p for p, _ in pairs] for kind, pairs in unknown_pairs().items()}


def routing(models: list[str], limits: dict[str, int], ratios, rows=ROUTED_ROWS) -> None:
    from seap.evaluation.routed import evaluate_routed
    from seap.inference.router import evaluate_router, fit_router
    from seap.model.loading import load_model

    for model_name in models:
        lm = load_model(model_name)
        stats = stats_for(lm, model_name)
        router_path = RESULTS / model_name / "router.json"
        cfg = eval_config(model_name, limits[model_name])
        for ratio in ratios:
            for row, _, method, extra in rows:
                path = RESULTS / model_name / f"{slug(row, ratio)}.json"
                if finished(path, cfg.limit) and router_path.is_file():
                    continue
                plan = plan_for(lm, stats, method, ratio, "task", extra)
                t0 = time.time()
                router = fit_router(lm, plan.experts, data_dir=DATA)
                fit_s = time.time() - t0
                if not router_path.is_file():
                    res = evaluate_router(lm, router, data_dir=DATA, unknown=_unknown_prompts())
                    write(router_path, {"model": model_name, "fit_seconds": round(fit_s, 1),
                                         "train_counts": router.meta["train_counts"],
                                         "threshold": router.threshold, **res.to_dict()})
                    log.info("%s router: accuracy %.4f", model_name, res.accuracy)
                if finished(path, cfg.limit):
                    continue
                t0 = time.time()
                rep = evaluate_routed(lm, plan, router, cfg, label=f"{row} {int(ratio * 100)}%")
                data = rep.to_dict()
                data.update(row=row, ratio=ratio, model=model_name, seconds=round(time.time() - t0, 1),
                            eval_config=cfg.to_dict())
                write(path, data)
                log.info("%s %s @%s: average %.4f", model_name, row, ratio, rep.average[0])
                del plan
                gc.collect()
        del lm
        gc.collect()

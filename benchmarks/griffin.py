"""GRIFFIN stage of benchmarks/run.py: XSum ROUGE and decode speed of dense, GRIFFIN and static magnitude.

Rows, per model: the dense model; GRIFFIN at each density (per-prompt experts from the prompt's
own prefill, no calibration); the static magnitude baseline at the same density (uniform widths,
no protected layers, FFN only: the same number of neurons in every layer, chosen once for all
prompts). XSum: the first N prompts of ../shared/data/xsum (1-shot, HELM rows), greedy, stop at
"###", ROUGE-1/2/L F-measures (results/<model>/xsum_<row>.json, one file per row so that an
interrupted run resumes). Speed: the same rows timed in one process at batch 1 and 8
(results/<model>/griffin_speed.json).
"""

from __future__ import annotations

import gc
import json
import logging
import time

from common import DATA, RESULTS, plan_for, slug, stats_for, write

log = logging.getLogger("benchmarks.griffin")

DENSITIES = (0.5, 0.75)  # GRIFFIN and magnitude at each
EXTRA_GRIFFIN: dict[str, tuple[float, ...]] = {}  # GRIFFIN alone at more densities (0.75 already kept SmolLM2
# within 1 ROUGE-L point of dense, so no 0.9 row is run)
XSUM_SHOTS = 1  # 0-shot prompts make SmolLM2 end the summary at once; the 1-shot row shows the format
GEN_BATCH = 8
SPEED_REPEATS = {"smollm2-135m": 7, "gemma3-270m": 3}


def _rows(model_name: str) -> list[tuple[str, float | None, str]]:
    """(row, density, kind) in the order they run: the pairs the issue compares come first, then
    GRIFFIN with one shared expert per batch (kind "shared": the batch-speed trade-off)."""
    rows = [("dense", None, "dense")]
    for d in DENSITIES:
        rows += [(f"GRIFFIN {d:g}", d, "griffin"), (f"magnitude {d:g}", d, "magnitude")]
    rows += [(f"GRIFFIN {d:g}", d, "griffin") for d in EXTRA_GRIFFIN.get(model_name, ())]
    rows += [(f"GRIFFIN {d:g} shared", d, "shared") for d in DENSITIES]
    # the short-prompt fixes (n0 = 64 tokens; the rows above are the paper's pure statistic); "+ density" is
    # seap's default GRIFFIN
    return rows + [("GRIFFIN 0.5 + prior", 0.5, "griffin-prior"), ("GRIFFIN 0.5 + density", 0.5, "griffin-density")]


def _magnitude(lm, model_name: str, density: float):
    """The static baseline: magnitude scores, the same width in every layer, FFN only."""
    from seap.pruning.surgery import sliced

    extra = {"protect_first": 0, "protect_last": 0}
    return sliced(lm, plan_for(lm, stats_for(lm, model_name), "magnitude", round(1 - density, 6), "all", extra), None)


def xsum(models: list[str], limit: int, only: list[str] | None = None) -> None:
    from seap.evaluation.generation import evaluate_xsum
    from seap.model.loading import load_model

    for model_name in models:
        lm = None
        rows = {r[0]: r for r in _rows(model_name)}
        if only and set(only) - set(rows):
            raise SystemExit(f"unknown xsum rows {sorted(set(only) - set(rows))}: choose from {sorted(rows)}")
        for row, density, kind in [rows[r] for r in only] if only else rows.values():
            path = RESULTS / model_name / f"xsum_{slug(row)}.json"
            if path.is_file() and json.loads(path.read_text()).get("n") == limit:
                continue
            lm = lm or load_model(model_name)
            model = _magnitude(lm, model_name, density) if kind == "magnitude" else lm
            t0 = time.time()
            if kind in ("griffin-prior", "griffin-density"):
                from seap import GriffinConfig

                griffin = GriffinConfig(density=density, short=kind.split("-")[1])
            else:  # a bare density: the paper's pure statistic
                griffin = density if kind in ("griffin", "shared") else None
            rep = evaluate_xsum(model, data_dir=DATA, limit=limit, shots=XSUM_SHOTS, batch_size=GEN_BATCH,
                                density=griffin, label=row, shared=kind == "shared")
            data = rep.to_dict()
            data.update(row=row, kind=kind, density=density, model=model_name, seconds=round(time.time() - t0, 1))
            write(path, data)
            log.info("%s %s: ROUGE-L %.2f in %.0fs", model_name, row, 100 * rep.rouge["rougeL"], time.time() - t0)
            del model
            gc.collect()
        del lm
        gc.collect()


SPEED_PROMPTS = 64  # XSum articles whose first 128 tokens are the timed prompts (distinct rows per repeat)


def griffin_speed(models: list[str]) -> None:
    from seap import GriffinConfig
    from seap.evaluation.bench import BenchConfig, bench_models, speed_table
    from seap.evaluation.generation import load_xsum
    from seap.model.loading import load_model

    # GRIFFIN's experts depend on the prompt: time it on real text (0-shot XSum prompts), not random tokens
    texts = [r["article"] for r in load_xsum(DATA, shots=0, limit=SPEED_PROMPTS)]

    for model_name in models:
        path = RESULTS / model_name / "griffin_speed.json"
        if path.is_file():
            continue
        lm = load_model(model_name)
        candidates, dynamic = {}, {}
        for row, density, kind in _rows(model_name):
            candidates[row] = _magnitude(lm, model_name, density) if kind == "magnitude" else lm
            if kind in ("griffin", "shared"):
                dynamic[row] = GriffinConfig(density=density, shared=kind == "shared")
        cfg = BenchConfig(prompt_len=128, gen_len=64, batch_sizes=(1, 8), warmup=1,
                          repeats=SPEED_REPEATS.get(model_name, 3), decode_path="seap")
        t0 = time.time()
        speeds = bench_models(candidates, cfg, griffin=dynamic, texts=texts)
        write(path, {"model": model_name, "config": cfg.__dict__, "rows": speed_table(speeds, "dense"),
                      "prompts": f"the first {SPEED_PROMPTS} 0-shot XSum prompts",
                      "models": {n: s.to_dict() for n, s in speeds.items()}, "seconds": round(time.time() - t0, 1)})
        log.info("%s GRIFFIN speed done in %.0fs", model_name, time.time() - t0)
        del candidates, lm
        gc.collect()

"""Speed stage of benchmarks/run.py: dense and pruned models timed in one process per model."""

from __future__ import annotations

import gc
import logging
import time

from common import CACHE, CONFIGS, RATIOS, RESULTS, plan_for, stats_for, write

log = logging.getLogger("benchmarks.speed")

# SEAP's experts (task or generic) share the logistic widths, so one of them stands for all.
SPEED_ROWS = [(row, method, protocol) for row, method, protocol, _ in CONFIGS if row != "SEAP-gen"]
REPEATS = {"smollm2-135m": 5, "gemma3-270m": 3}


def speed(models: list[str]) -> None:
    from seap.evaluation.bench import BenchConfig, bench_models, speed_table
    from seap.model.loading import load_model
    from seap.pruning.surgery import sliced

    for model_name in models:
        path = RESULTS / model_name / "speed.json"
        if path.is_file():
            continue
        lm = load_model(model_name)
        stats = stats_for(lm, model_name)
        candidates = {"dense": lm}
        for ratio in RATIOS:
            for row, method, protocol in SPEED_ROWS:
                plan = plan_for(lm, stats, method, ratio, protocol, {})
                expert = "generic" if protocol == "task" else None
                candidates[f"{row} {int(ratio * 100)}%"] = sliced(lm, plan, expert)
        result = {"model": model_name, "cache": str(CACHE), "runs": {}}
        # transformers' generate() is timed on SmolLM2 only, to show the per-token overhead it adds
        paths = (("seap", (1, 8)), ("generate", (1,))) if model_name == "smollm2-135m" else (("seap", (1, 8)),)
        for path_name, batches in paths:
            cfg = BenchConfig(prompt_len=128, gen_len=64, batch_sizes=batches, warmup=1,
                              repeats=REPEATS.get(model_name, 3), decode_path=path_name)
            t0 = time.time()
            speeds = bench_models(candidates, cfg)
            result["runs"][path_name] = {"config": cfg.__dict__, "rows": speed_table(speeds, "dense"),
                                         "models": {n: s.to_dict() for n, s in speeds.items()},
                                         "seconds": round(time.time() - t0, 1)}
            log.info("%s %s done in %.0fs", model_name, path_name, time.time() - t0)
        write(path, result)
        del candidates, lm
        gc.collect()

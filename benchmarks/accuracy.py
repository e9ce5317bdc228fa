"""Accuracy stage of benchmarks/run.py: the six-task suite and perplexity of each (model, row, ratio),
one results file each under results/<model>/ (the accuracy, reconstruction and paper-protocol stages)."""

from __future__ import annotations

import gc
import logging
import time

from common import finished, RATIOS, RESULTS, CONFIGS, EXTRA_CONFIGS, eval_config, plan_for, slug, stats_for, write

log = logging.getLogger("benchmarks")


def accuracy(models: list[str], limits: dict[str, int], extra: bool, ratios=RATIOS, configs=None,
             dense: bool = True) -> None:
    from seap.evaluation.runner import evaluate_model, evaluate_plan
    from seap.model.loading import load_model

    for model_name in models:
        lm = None
        jobs = [("dense", None, None, None, 0.0)] if dense else []
        rows = configs if configs is not None else CONFIGS + (EXTRA_CONFIGS if extra else ())
        jobs += [(row, method, protocol, x, r) for r in ratios for row, method, protocol, x in rows]
        for row, method, protocol, x, ratio in jobs:
            path = RESULTS / model_name / f"{slug(row, ratio)}.json"
            if finished(path, limits[model_name]):
                continue  # finished earlier with the same number of items
            if lm is None:
                lm = load_model(model_name)
                stats = stats_for(lm, model_name)
            cfg = eval_config(model_name, limits[model_name])
            t0 = time.time()
            log.info("%s: %s @ %s", model_name, row, ratio)
            if method is None:
                rep = evaluate_model(lm, cfg, label="dense")
            else:
                plan = plan_for(lm, stats, method, ratio, protocol, x)
                experts = "wikitext2-tail" if protocol == "wikitext-tail" else protocol
                rep = evaluate_plan(lm, plan, cfg, experts=experts, label=f"{row} {int(ratio * 100)}%")
            data = rep.to_dict()
            if method is not None and "reconstruction" in plan.meta.extra:
                data["reconstruction"] = plan.meta.extra["reconstruction"]
            data.update(row=row, ratio=ratio, model=model_name, seconds=round(time.time() - t0, 1),
                        eval_config=cfg.to_dict())
            write(path, data)
            log.info("  average %.4f in %.0fs", rep.average[0], time.time() - t0)
            gc.collect()
        del lm
        gc.collect()



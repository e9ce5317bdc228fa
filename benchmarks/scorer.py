"""The selective lm-eval scorer against HFLM on the bundled models: same numbers, time per item.

    python benchmarks/run.py --stage scorer     # results/<model>/scorer.json

Each model scores the first N items of each accuracy task twice per scorer (the first run warms
up), alternating HFLM and the selective scorer, in one process; the report gives the median
seconds, the speed-up, and the largest difference of any log-likelihood between the two.
"""

from __future__ import annotations

import statistics
import time

from common import DATA, RESULTS, TASKS, write


def _requests(lm, tasks, limit: int):
    """lm-eval's own loglikelihood requests for the tasks' first `limit` items."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from seap.evaluation.harness import _task_folder

    reqs = []
    with _task_folder(tasks, DATA) as (folder, _):
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        for name, task in get_task_dict(list(tasks), manager).items():
            task.build_all_requests(limit=limit, rank=0, world_size=1)
            reqs += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return reqs


def scorer(models, limit: int = 20, repeats: int = 2) -> None:
    import torch

    from seap.evaluation.harness import make_lm
    from seap.models import load_model

    for model_name in models:
        lm = load_model(model_name)
        reqs = _requests(lm, TASKS, limit)
        times = {"hflm": [], "selective": []}
        out = {}
        for rep in range(repeats + 1):
            for name, exact in (("hflm", True), ("selective", False)):
                scorer_lm = make_lm(lm.model, lm.tokenizer, batch_size=16, max_length=2048, exact=exact)
                t0 = time.perf_counter()
                out[name] = scorer_lm.loglikelihood(reqs, disable_tqdm=True)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
        a = torch.tensor([x for x, _ in out["hflm"]], dtype=torch.float64)
        b = torch.tensor([x for x, _ in out["selective"]], dtype=torch.float64)
        med = {k: statistics.median(v) for k, v in times.items()}
        data = {
            "model": model_name, "tasks": list(TASKS), "items_per_task": limit, "requests": len(reqs),
            "seconds": times, "median_seconds": med, "speedup": med["hflm"] / med["selective"],
            "max_abs_diff": float((a - b).abs().max()),
            "greedy_equal": [g for _, g in out["hflm"]] == [g for _, g in out["selective"]],
            "command": "python benchmarks/run.py --stage scorer",
        }
        write(RESULTS / model_name / "scorer.json", data)
        print(f"{model_name}: {len(reqs)} requests, HFLM {med['hflm']:.1f} s, selective {med['selective']:.1f} s, "
              f"{data['speedup']:.2f}x, max |diff| {data['max_abs_diff']:.2e}", flush=True)
        del lm

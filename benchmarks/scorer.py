"""The selective lm-eval scorer against HFLM on the bundled models: same numbers, time per item.

    python benchmarks/run.py --stage scorer     # results/<model>/scorer.json

Each model scores lm-eval's own requests for the first N items of each accuracy task with three
scorers in turn, in one process: HFLM; seap's scorer with the LM head at the read positions only
("head only"); and with each question's shared context packed once as well ("selective", the one
evaluations use). Each runs once to warm up, then `repeats` timed rounds; the report gives the
median seconds, the speed-ups over HFLM, the tokens each runs through the model, and the largest
difference of any log-likelihood from HFLM's.
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
    from seap.evaluation.scorer import plan_rows
    from seap.model.loading import load_model

    # HFLM; the selective scorer with its LM head at the read positions only; and with shared contexts packed
    variants = (("hflm", True, False), ("head only", False, False), ("selective", False, True))
    for model_name in models:
        lm = load_model(model_name)
        reqs = _requests(lm, TASKS, limit)
        times = {name: [] for name, _, _ in variants}
        out, tokens = {}, {}
        for rep in range(repeats + 1):
            for name, exact, pack in variants:
                scorer_lm = make_lm(lm.model, lm.tokenizer, batch_size=16, max_length=2048, exact=exact)
                if not exact:
                    scorer_lm.pack_contexts = pack
                    pairs = [scorer_lm._encode_pair(*r.args) for r in reqs]
                    rows = plan_rows(pairs, scorer_lm.max_length, scorer_lm._window, scorer_lm._packs)
                    tokens[name] = sum(len(row.tokens) for row in rows)
                t0 = time.perf_counter()
                out[name] = scorer_lm.loglikelihood(reqs, disable_tqdm=True)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
        ref = torch.tensor([x for x, _ in out["hflm"]], dtype=torch.float64)
        med = {k: statistics.median(v) for k, v in times.items()}
        data = {
            "model": model_name, "tasks": list(TASKS), "items_per_task": limit, "requests": len(reqs),
            "seconds": times, "median_seconds": med, "speedup": med["hflm"] / med["selective"],
            "speedup_head_only": med["hflm"] / med["head only"], "tokens_run": tokens,
            "max_abs_diff": max(float((torch.tensor([x for x, _ in out[n]], dtype=torch.float64) - ref).abs().max())
                                for n in ("head only", "selective")),
            "greedy_equal": all([g for _, g in out["hflm"]] == [g for _, g in out[n]] for n in ("head only", "selective")),
            "command": "python benchmarks/run.py --stage scorer",
        }
        write(RESULTS / model_name / "scorer.json", data)
        print(f"{model_name}: {len(reqs)} requests, HFLM {med['hflm']:.1f} s, head only {med['head only']:.1f} s, "
              f"selective {med['selective']:.1f} s, {data['speedup']:.2f}x, tokens {tokens}, "
              f"max |diff| {data['max_abs_diff']:.2e}", flush=True)
        del lm

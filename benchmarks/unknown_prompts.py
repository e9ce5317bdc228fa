"""What a prompt of a kind the router never saw gets (issue 33, item 4).

    python benchmarks/unknown_prompts.py --models smollm2-135m --ratios 0.5

For seap's default task-expert plan (the `seap` preset on the six tasks' calibration text, each expert
refitted on its own corpus: the "SEAP (routed, default)" row's plan) and its router, prompts of two
kinds absent from the router's training set (GSM8K test questions with their gold solutions, XSum
0-shot articles with their reference summaries) are routed, and the reference answer's mean negative
log-likelihood per token is measured under the expert the router picks, under the generic expert,
and under the dense model. The cost of routing is routed - generic on the prompts the router sent to
a task expert (paired over the same prompts, with its standard error).
Results: benchmarks/results/<model>/unknown_prompts.json and a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DATA, RESULTS, plan_for, read_result, stats_for, unknown_pairs, write  # noqa: E402

log = logging.getLogger("benchmarks")


@torch.no_grad()
def answer_nll(model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 2048) -> list[float]:
    """Mean NLL per token of each answer given its prompt (the prompt cut from the left to fit)."""
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=True).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        ids = (p + a)[-max_length:]
        n = min(len(a), len(ids) - 1)
        # the LM head at the answer's positions only (a 262k vocabulary over a whole article is GBs)
        logits = model(torch.tensor([ids]), logits_to_keep=n + 1).logits[0, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-n:]))))
    return out


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan"))


def measure(model_name: str, ratio: float) -> dict:
    from seap.inference.router import ROUTER_VERSION, fit_router
    from seap.model.loading import load_model
    from seap.pruning.plan import GENERIC
    from seap.pruning.surgery import sliced

    t0 = time.time()
    lm = load_model(model_name)
    plan = plan_for(lm, stats_for(lm, model_name), "seap", ratio, "task", {"multiple": None})
    router = fit_router(lm, plan.experts, data_dir=DATA)
    kinds = {}
    for kind, pairs in unknown_pairs().items():
        routes = router.route(lm, [p for p, _ in pairs])
        chosen = [r.expert for r in routes]
        nll = {"dense": answer_nll(lm.model, lm.tokenizer, pairs)}
        for name in sorted(set(chosen) | {GENERIC}):
            idx = [i for i, e in enumerate(chosen) if e == name] if name != GENERIC else range(len(pairs))
            model = sliced(lm, plan, name).model
            scores = answer_nll(model, lm.tokenizer, [pairs[i] for i in idx])
            nll[name] = dict(zip(idx, scores))
            del model
        generic = [nll[GENERIC][i] for i in range(len(pairs))]
        routed = [nll[e][i] for i, e in enumerate(chosen)]
        away = [i for i, e in enumerate(chosen) if e != GENERIC]
        cost = [routed[i] - generic[i] for i in away]
        kinds[kind] = {
            "prompts": len(pairs), "to_generic": 1 - len(away) / len(pairs),
            "routed_to": {e: chosen.count(e) for e in sorted(set(chosen))},
            "nll_dense": _mean_se(nll["dense"]), "nll_generic": _mean_se(generic), "nll_routed": _mean_se(routed),
            "away": {"prompts": len(away), "nll_dense": _mean_se([nll["dense"][i] for i in away]),
                     "nll_generic": _mean_se([generic[i] for i in away]),
                     "nll_routed": _mean_se([routed[i] for i in away]), "routed_minus_generic": _mean_se(cost)},
            "per_prompt": {"expert": chosen, "dense": nll["dense"], "generic": generic, "routed": routed},
        }
        log.info("%s %s %.0f%%: %s", model_name, kind, 100 * ratio, json.dumps(
            {k: v for k, v in kinds[kind].items() if k != "per_prompt"}))
    return {"model": model_name, "ratio": ratio, "plan": "seap preset, task experts (the routed default row's plan)",
            "router": {"threshold": router.threshold, "classes": list(router.classes), "version": ROUTER_VERSION,
                       "generic_choice": plan.experts[GENERIC].stats["reconstruction"]["choice"]}, "kinds": kinds,
            "seconds": round(time.time() - t0, 1)}


# the router's tests for unseen kinds, each as RouterConfig settings: the version-3 form test alone, at its
# quantile and a stricter one, and with the vocabulary test (version 4) at two quantiles
ROUTER_VARIANTS = (("form 0.998 (v3)", {"vocab_quantile": None}), ("form 0.99", {"ood_quantile": 0.99, "vocab_quantile": None}),
                   ("form 0.98", {"ood_quantile": 0.98, "vocab_quantile": None}),
                   ("form 0.998 + vocabulary 0.01", {"vocab_quantile": 0.01}),
                   ("form 0.998 + vocabulary 0.005 (default)", {"vocab_quantile": 0.005}))


def router_shares(model_name: str) -> dict:
    """Per router variant: validation routing accuracy (own expert), the share of validation prompts sent
    to the generic expert, and the share of each unseen kind sent there. Routing reads the experts' names
    only, so the paper-recipe plan stands in for any task-expert plan."""
    from seap.inference.router import RouterConfig, evaluate_router, fit_router
    from seap.model.loading import load_model

    lm = load_model(model_name)
    plan = plan_for(lm, stats_for(lm, model_name), "seap-paper", 0.5, "task", {})
    unknown = {k: [p for p, _ in v] for k, v in unknown_pairs().items()}
    out = {}
    for name, settings in ROUTER_VARIANTS:
        res = evaluate_router(lm, fit_router(lm, plan.experts, RouterConfig(**settings), data_dir=DATA), data_dir=DATA,
                              unknown=unknown)
        out[name] = {"settings": settings, "accuracy": res.accuracy, "to_generic": res.fallback_rate,
                     "unknown_to_generic": res.unknown, "n": res.meta["n"]}
        log.info("%s router %s: %s", model_name, name, json.dumps(out[name]))
    return out


def shares_section(models) -> str:
    text = ""
    for m in models:
        data = read_result(RESULTS / m / "router_variants.json")
        if not data:
            continue
        if not text:
            text = ("The router's tests for unseen kinds (`python benchmarks/unknown_prompts.py --shares`): each "
                    "variant fitted on the train splits, routed on the six validation splits (accuracy: the share "
                    "of prompts that reach their own task's expert) and on the 300 GSM8K and 300 XSum prompts.\n\n"
                    "| model | router | validation accuracy | validation to generic | GSM8K to generic | "
                    "XSum to generic |\n|---|---|---|---|---|---|\n")
        for name, r in data["variants"].items():
            u = r["unknown_to_generic"]
            text += (f"| {m} | {name} | {100 * r['accuracy']:.2f}% | {100 * r['to_generic']:.1f}% | "
                     f"{100 * u['gsm8k (test)']:.1f}% | {100 * u['xsum (0-shot prompts)']:.1f}% |\n")
    return text + "\n" if text else text


def unknown_section(models) -> str:
    """RESULTS.md: the reference answers' NLL per token under the routed expert, the generic one and dense."""
    text = ""
    for m in models:
        data = read_result(RESULTS / m / "unknown_prompts.json")
        if not data:
            continue
        if not text:
            text = ("\n## Prompts of unseen kinds: what routing costs\n\n`python benchmarks/unknown_prompts.py`: seap's "
                    "default task-expert plan (the `seap` preset, each expert refitted on its own calibration corpus) and "
                    "its router; GSM8K test questions and XSum 0-shot articles, neither a router class. NLL = the "
                    "reference answer's (gold solution, reference summary) mean negative log-likelihood per token, "
                    "lower is better; '± s.e.' over prompts. 'Sent away' are the prompts the router gave a task "
                    "expert; the cost of routing is their routed - generic NLL, paired.\n\n")
        text += (f"{m}:\n\n| ratio | prompts | to generic | NLL dense | NLL generic | NLL routed | sent away | "
                 "their NLL: generic | routed | routed - generic ± s.e. |\n|---|---|---|---|---|---|---|---|---|---|\n")
        # rows are keyed by ratio; a superseded measurement keeps its own key, so the row's ratio is read
        for _, row in sorted(data["rows"].items(), key=lambda kv: (kv[1]["ratio"], kv[0])):
            r, ratio = row["router"], row["ratio"]
            text += (f"| {int(float(ratio) * 100)}% | router version {r.get('version', 3)}, generic expert's channels: "
                     f"{r.get('generic_choice', 'obs')} | | | | | | | | |\n")
            for kind, k in row["kinds"].items():
                a = k["away"]
                f = lambda ms: "—" if ms[0] != ms[0] else f"{ms[0]:.3f}"  # noqa: E731 (NaN: no prompt)
                cost = "—" if not a["prompts"] else f"{a['routed_minus_generic'][0]:+.3f} ± {a['routed_minus_generic'][1]:.3f}"
                text += (f"| {int(float(ratio) * 100)}% | {kind}, {k['prompts']} | {100 * k['to_generic']:.0f}% | "
                         f"{f(k['nll_dense'])} | {f(k['nll_generic'])} | {f(k['nll_routed'])} | {a['prompts']} | "
                         f"{f(a['nll_generic'])} | {f(a['nll_routed'])} | {cost} |\n")
        text += "\n"
    return text + shares_section(models) if text else text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--shares", action="store_true",
                    help="only: where each router variant sends the validation and unseen-kind prompts")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.shares:
        for model_name in args.models.split(","):
            write(RESULTS / model_name / "router_variants.json",
                  {"model": model_name, "variants": router_shares(model_name)})
        return 0
    for model_name in args.models.split(","):
        path = RESULTS / model_name / "unknown_prompts.json"
        data = read_result(path) or {"model": model_name, "rows": {}}
        for ratio in (float(r) for r in args.ratios.split(",")):
            if str(ratio) not in data["rows"]:
                data["rows"][str(ratio)] = measure(model_name, ratio)
                write(path, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

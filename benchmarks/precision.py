"""Precision stage of benchmarks/run.py: is bfloat16 calibration safe as the GPU default?

SmolLM2-135M-Instruct is calibrated twice on the same text (the embedded corpus, `seap prune`'s
default), once loaded in float32 and once in bfloat16, and pruned by 50% with SEAP's default
recipe. The two plans are compared channel by channel, and both are evaluated on the same float32
model (lm-eval, six tasks, the same items), so that only the plan differs: the paired difference
of their averages says whether bf16 statistics cost accuracy.

    python benchmarks/run.py --stage precision
"""

from __future__ import annotations

import logging
import time

from common import paired_delta, RESULTS, write, eval_config

log = logging.getLogger("benchmarks.precision")
MODEL = "smollm2-135m"
RATIO = 0.5
PATH = RESULTS / MODEL / "precision.json"


def overlap(a, b) -> dict:
    """Shared kept channels of two experts: per layer and over the model (of the float32 plan's)."""
    per_layer = []
    for x, y in zip(a.ffn, b.ffn):
        sx, sy = set(x.tolist()), set(y.tolist())
        per_layer.append(len(sx & sy) / max(1, len(sx)))
    kept = sum(len(x) for x in a.ffn)
    shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a.ffn, b.ffn))
    return {"shared_of_float32_kept": shared / kept, "min_layer": min(per_layer), "per_layer": per_layer,
            "same_widths": a.widths() == b.widths()}


def precision(limit: int) -> None:
    import torch

    from seap import PruneConfig
    from seap.calibration.layerwise import collect_stats
    from seap.evaluation.runner import evaluate_plan
    from seap.model.fingerprints import fingerprint
    from seap.model.loading import load_model
    from seap.pruning.plan import build_plan
    from seap.tasks import resolve_corpus

    corpus = resolve_corpus("default")
    plans, seconds, tokens = {}, {}, 0
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_model(MODEL, dtype=dtype)
        t0 = time.time()
        stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, corpus.texts, meta={"corpus": "default"},
                              progress=False)
        seconds[str(dtype)] = round(time.time() - t0, 1)
        tokens = stats.n_tokens
        plans[str(dtype)] = build_plan(lm.model, lm.adapter, PruneConfig.from_method("seap-paper", ratio=RATIO),
                                       {"default": stats}, base_model=MODEL, revision=None,
                                       fingerprint=fingerprint(lm.model, lm.adapter))
        log.info("%s: statistics of %d tokens in %.0fs", dtype, stats.n_tokens, seconds[str(dtype)])
    f32, b16 = plans["torch.float32"], plans["torch.bfloat16"]
    data = {"model": MODEL, "ratio": RATIO, "calibration": {"corpus": "default", "texts": len(corpus.texts),
                                                              "tokens": tokens, "seconds": seconds},
            "overlap": overlap(f32.experts["default"], b16.experts["default"]), "rows": {}}
    lm = load_model(MODEL)  # float32: the plans differ, the model evaluating them does not
    cfg = eval_config(MODEL, limit)
    for name, plan in (("float32 calibration", f32), ("bfloat16 calibration", b16)):
        t0 = time.time()
        rep = evaluate_plan(lm, plan, cfg, experts="default", label=f"SEAP 50% ({name})")
        data["rows"][name] = {**rep.to_dict(), "seconds": round(time.time() - t0, 1)}
        log.info("%s: average %.4f", name, rep.average[0])
    data["eval_config"] = cfg.to_dict()
    write(PATH, data)


def precision_section() -> str:
    import json


    if not PATH.is_file():
        return ""
    d = json.loads(PATH.read_text())
    f32, b16 = d["rows"]["float32 calibration"], d["rows"]["bfloat16 calibration"]
    delta, se = paired_delta(b16, f32)
    ov = d["overlap"]
    text = (f"\n## Precision: bfloat16 calibration ({d['model']}, SEAP {int(100 * d['ratio'])}%)\n\n"
            "`python benchmarks/run.py --stage precision`: the same embedded calibration corpus through the model "
            "loaded in float32 and in bfloat16; both plans evaluated on the float32 model (same items), so only the "
            "plan differs.\n\n"
            f"- Kept channels shared with the float32 plan: **{100 * ov['shared_of_float32_kept']:.2f}%** over the "
            f"model (lowest layer {100 * ov['min_layer']:.1f}%); same per-layer widths: {ov['same_widths']}.\n\n"
            "| calibration | average ± s.e. | Δ vs float32 ± paired s.e. | token ppl |\n|---|---|---|---|\n")
    for name, r in d["rows"].items():
        avg = r["average"]
        ppl = r.get("token_perplexity") or {}
        dd = "—" if r is f32 else f"{100 * delta:+.2f} ± {100 * se:.2f}"
        text += (f"| {name} | {100 * avg['value']:.2f} ± {100 * avg['stderr']:.2f} | {dd} | "
                 f"{ppl.get('perplexity', float('nan')):.2f} |\n")
    verdict = "within" if abs(delta) <= se else ("within two" if abs(delta) <= 2 * se else "outside two")
    text += (f"\nThe bf16 plan's average differs by {100 * delta:+.2f} points, {verdict} paired standard "
             f"error(s) ({100 * se:.2f}); N = {d['eval_config']['limit']} items per task.\n")
    return text

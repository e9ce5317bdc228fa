"""Reproduce SEAP's accuracy and speed tables on the bundled models; writes benchmarks/RESULTS.md.

    python benchmarks/run.py                      # everything (cached results are reused)
    python benchmarks/run.py --stage accuracy     # or: routing, speed, xsum, griffin-speed, precision,
                                                  #     short-prompts, render
    python benchmarks/scaling.py                  # cost at 135M-8B on random-weight checkpoints (separate)

Each (model, method, ratio) result is a JSON file under benchmarks/results/, written when it
finishes, so an interrupted run resumes where it stopped; `render` rebuilds RESULTS.md and the
plot from those files. Calibration statistics are cached in benchmarks/.cache (ignored by git).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
DATA = ROOT.parent / "shared" / "data"

MODELS = ("smollm2-135m", "gemma3-270m")
RATIOS = (0.2, 0.5)
sys.path.insert(0, str(ROOT / "src"))  # a checkout without an install still runs
from seap.tasks import SUITE as TASKS  # noqa: E402
LM_CORPUS = "default:general_text"  # language-modelling text (weight 3 in SEAP-gen); not WikiText, whose test split is the perplexity set
CALIBRATION_LIMIT = {"smollm2-135m": 400, "gemma3-270m": 200}  # training examples per task corpus
# (row name, method, plan expert protocol, extra PruneConfig settings)
CONFIGS = (
    ("WandA-sp", "wanda-sp", "all", {}),
    ("FLAP", "flap", "all", {}),
    ("SEAP (task experts)", "seap-paper", "task", {}),
    ("SEAP-gen", "seap-paper", "generic", {}),
)
EXTRA_CONFIGS = (  # run after the required rows: SEAP with FLAP's fluctuation score s_F
    ("SEAP s_F (task experts)", "seap-paper", "task", {"score": "wifv"}),
    ("SEAP-gen s_F", "seap-paper", "generic", {"score": "wifv"}),
    # seap's default widths (multiples of 32) against the exact widths of the rows above: their cost
    ("SEAP-gen (multiple 32)", "seap-paper", "generic", {"multiple": 32}),
)

# Training-free reconstruction (seap.reconstruct) on top of each method, same calibration text
RECON_CONFIGS = (
    ("SEAP-gen + sequential refit", "seap-paper", "generic", {"reconstruct": "sequential"}),
    ("FLAP + sequential refit", "flap", "all", {"reconstruct": "sequential"}),
    ("WandA-sp + sequential refit", "wanda-sp", "all", {"reconstruct": "sequential"}),
    ("SEAP (task experts) + sequential refit", "seap-paper", "task", {"reconstruct": "sequential"}),
    ("SEAP-gen + refit", "seap-paper", "generic", {"reconstruct": "refit"}),
    # the channel choice for the refit (greedy OBS), on each allocation: seap's default is the first
    ("SEAP-gen (default: refit, OBS choice)", "seap", "generic", {"multiple": None}),
    ("FLAP + refit, OBS choice", "flap", "all", {"reconstruct": "refit", "refit_choice": "obs"}),
    ("WandA-sp + refit, OBS choice", "wanda-sp", "all", {"reconstruct": "refit", "refit_choice": "obs"}),
    ("SEAP (task experts, default)", "seap", "task", {"multiple": None}),
    ("SEAP-gen + sequential refit, OBS choice", "seap", "generic", {"multiple": None, "reconstruct": "sequential"}),
)

# The paper's protocol (SEAP on each task's own data, the baselines on general text as their papers
# calibrate them): WandA-sp and FLAP calibrated on WikiText-2, and SEAP at the reference code's
# effective ratio. Only WikiText-2's test split is here: its tail, disjoint from what perplexity scores.
PAPER_CONFIGS = (
    ("WandA-sp (WikiText-2 calibration)", "wanda-sp", "wikitext-tail", {}),
    ("FLAP (WikiText-2 calibration)", "flap", "wikitext-tail", {}),
)
# The SEAP reference code's "50%" removes about 44% of the prunable parameters: that row, nominally 50%
REFERENCE_CONFIGS = (("SEAP (task experts), reference's effective 44%", "seap-paper", "task", {"ratio": 0.44}),)
WIKITEXT_TAIL = (0.6, 128, 2000)  # from 60% of the test stream on: 128 pieces of 2,000 characters

log = logging.getLogger("benchmarks")


def _slug(*parts) -> str:
    return "_".join(str(p).lower().replace(" ", "-").replace("(", "").replace(")", "").replace("/", "-")
                    .replace(":", "").replace(",", "") for p in parts)


def _write(path: Path, data: dict) -> None:
    from seap._io import write_json

    write_json(path, data)


def _stats(lm, model_name: str) -> dict:
    from seap.pipeline import collect

    return collect(lm, (*TASKS, LM_CORPUS), data_dir=DATA, limit=CALIBRATION_LIMIT.get(model_name, 400), batch_size=8,
                   max_length=512,
                   out=CACHE / model_name / "stats", progress=False)


def _plan(lm, stats: dict, method: str, ratio: float, protocol: str, extra: dict):
    from seap.config import PruneConfig
    from seap.models import fingerprint
    from seap.plan import build_plan

    # The accuracy rows were measured with exact widths (multiple 1, the default then); seap's default
    # is now multiples of 32, measured apart by the "SEAP-gen (multiple 32)" row.
    cfg = PruneConfig.from_method(method, **{"ratio": ratio, "multiple": 1, **extra})
    if protocol == "wikitext-tail":
        stats = {"wikitext2-tail": _wikitext_stats(lm, lm.source.model_id)}
    if protocol == "all":  # baselines: one mask from all calibration text pooled
        it = iter(stats.values())
        merged = next(it)
        for s in it:
            merged = merged.merge(s)
        stats = {"all": merged}
    plan = build_plan(lm.model, lm.adapter, cfg, stats, base_model=lm.source.model_id,
                      revision=lm.source.revision, fingerprint=fingerprint(lm.model, lm.adapter))
    if cfg.reconstructs:
        _reconstruct(lm, plan, cfg, protocol)
    return plan


def wikitext_tail() -> list[str]:
    """Calibration text for the baselines' own protocol: pieces of WikiText-2's test stream from 60% of
    it on. Token perplexity scores its first 16 windows of 1,024 tokens and word perplexity its first
    articles (about 5% of the stream), so the two never overlap."""
    from seap.evaluation.perplexity import wikitext_stream

    text, _ = wikitext_stream(DATA)
    start, n, size = WIKITEXT_TAIL
    tail = text[int(start * len(text)):]
    return [tail[i * size:(i + 1) * size] for i in range(min(n, len(tail) // size))]


def _wikitext_stats(lm, model_name: str):
    from seap.stats import ActivationStats, collect_stats

    path = CACHE / model_name / "stats" / "wikitext2_tail.safetensors"
    if path.is_file():
        return ActivationStats.load(path)
    s = collect_stats(lm.model, lm.tokenizer, lm.adapter, wikitext_tail(), batch_size=8, max_length=512,
                      meta={"corpus": "wikitext2-tail"}, progress=False)
    s.save(path)
    return s


def _reconstruct(lm, plan, cfg, protocol: str) -> None:
    """Refit the experts a row evaluates, each on the calibration text its channels came from."""
    from seap.plan import GENERIC
    from seap.reconstruct import RefitConfig, error_summary, reconstruct_plan
    from seap.tasks import resolve_corpus

    limit = CALIBRATION_LIMIT.get(lm.source.model_id, 400)
    texts = {t: list(resolve_corpus(t, data_dir=DATA, limit=limit, seed=0).texts) for t in (*TASKS, LM_CORPUS)}
    pooled = [x for v in texts.values() for x in v]
    corpora = {"all": pooled} if protocol == "all" else {GENERIC: pooled} if protocol == "generic" else \
        {t: texts[t] for t in TASKS}
    t0 = time.time()
    reconstruct_plan(lm, plan, corpora, RefitConfig.of(cfg, lm.adapter, lm.model.config), batch_size=8, max_length=512, progress=False)
    plan.meta["reconstruction"] = {"seconds": round(time.time() - t0, 1),
                                   "errors": {n: error_summary(plan.experts[n]) for n in corpora}}


# Perplexity subsets per model: Gemma 3's 262k-entry vocabulary makes every scored token ~5x dearer.
PPL = {"smollm2-135m": (16, 2), "gemma3-270m": (8, 1)}  # (1024-token windows, WikiText articles)


def eval_config(model_name: str, limit: int):
    from seap.evaluation.runner import EvalConfig

    windows, docs = PPL.get(model_name, (16, 2))
    return EvalConfig(tasks=TASKS, data_dir=str(DATA), limit=limit, batch_size=16, max_length=2048,
                      ppl_window=1024, ppl_windows=windows, word_ppl_docs=docs)


def accuracy(models: list[str], limits: dict[str, int], extra: bool, ratios=RATIOS, configs=None,
             dense: bool = True) -> None:
    from seap.evaluation.runner import evaluate_model, evaluate_plan
    from seap.models import load_model

    for model_name in models:
        lm = None
        jobs = [("dense", None, None, None, 0.0)] if dense else []
        rows = configs if configs is not None else CONFIGS + (EXTRA_CONFIGS if extra else ())
        jobs += [(row, method, protocol, x, r) for r in ratios for row, method, protocol, x in rows]
        for row, method, protocol, x, ratio in jobs:
            path = RESULTS / model_name / f"{_slug(row, ratio)}.json"
            if path.is_file() and json.loads(path.read_text()).get("eval_config", {}).get("limit") == limits[model_name]:
                continue  # finished earlier with the same number of items
            if lm is None:
                lm = load_model(model_name)
                stats = _stats(lm, model_name)
            cfg = eval_config(model_name, limits[model_name])
            t0 = time.time()
            log.info("%s: %s @ %s", model_name, row, ratio)
            if method is None:
                rep = evaluate_model(lm, cfg, label="dense")
            else:
                plan = _plan(lm, stats, method, ratio, protocol, x)
                experts = "wikitext2-tail" if protocol == "wikitext-tail" else protocol
                rep = evaluate_plan(lm, plan, cfg, experts=experts, label=f"{row} {int(ratio * 100)}%")
            data = rep.to_dict()
            if method is not None and "reconstruction" in plan.meta:
                data["reconstruction"] = plan.meta["reconstruction"]
            data.update(row=row, ratio=ratio, model=model_name, seconds=round(time.time() - t0, 1),
                        eval_config=cfg.__dict__)
            _write(path, data)
            log.info("  average %.4f in %.0fs", rep.average[0], time.time() - t0)
            gc.collect()
        del lm
        gc.collect()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("all", "accuracy", "routing", "speed", "xsum", "griffin-speed", "schedules",
                                        "llamacpp", "precision", "short-prompts", "reconstruction", "paper-protocol",
                                        "scorer", "render"),
                    default="all")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--limit", default="smollm2-135m=250,gemma3-270m=50",
                    help="items per task, per model (first N of each validation split, as lm-eval --limit)")
    ap.add_argument("--extra", action="store_true", help="also run the SEAP s_F variant rows")
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="accuracy stage: these ratios only")
    ap.add_argument("--scorer-limit", type=int, default=20, help="scorer stage: first N items of each task")
    ap.add_argument("--xsum-limit", type=int, default=200, help="xsum stage: first N prompts")
    ap.add_argument("--rows", default=None, help="xsum, accuracy and reconstruction stages: only these rows, in this order (comma-separated, "
                    "e.g. 'magnitude 0.75,GRIFFIN 0.75'), so that a second process can share the work")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not DATA.is_dir():
        print(f"benchmarks need ../shared/data (looked in {DATA})", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    limits = {k: int(v) for k, v in (kv.split("=") for kv in args.limit.split(","))}
    def chosen(configs):  # --rows: a full row name, or names separated by commas
        return [r for r in configs if not args.rows or r[0] == args.rows or r[0] in args.rows.split(",")]

    if args.stage in ("all", "accuracy"):
        rows = chosen(CONFIGS + (EXTRA_CONFIGS if args.extra else ()))
        accuracy(models, limits, args.extra, tuple(float(r) for r in args.ratios.split(",")), rows,
                 dense=not args.rows or "dense" in args.rows.split(","))
    if args.stage in ("all", "reconstruction"):
        accuracy(models, limits, False, tuple(float(r) for r in args.ratios.split(",")), chosen(RECON_CONFIGS),
                 dense=False)
    if args.stage in ("all", "paper-protocol"):
        accuracy(models, limits, False, tuple(float(r) for r in args.ratios.split(",")), PAPER_CONFIGS, dense=False)
        accuracy(models, limits, False, (0.5,), REFERENCE_CONFIGS, dense=False)
    if args.stage in ("all", "routing"):
        from routing import routing  # noqa: E402  (benchmarks/routing.py)

        routing(models, limits, tuple(float(r) for r in args.ratios.split(",")))
    if args.stage in ("all", "speed"):
        from speed import speed  # noqa: E402  (benchmarks/speed.py)

        speed(models)
    if args.stage in ("all", "xsum"):
        from griffin import xsum  # noqa: E402  (benchmarks/griffin.py)

        xsum(models, args.xsum_limit, [r.strip() for r in args.rows.split(",")] if args.rows else None)
    if args.stage in ("all", "griffin-speed"):
        from griffin import griffin_speed  # noqa: E402

        griffin_speed(models)
    if args.stage in ("all", "schedules"):
        from schedules import schedules  # noqa: E402  (benchmarks/schedules.py)

        schedules(models, limits)
    if args.stage in ("all", "llamacpp"):
        from llamacpp import llamacpp, llamacpp_default  # noqa: E402  (benchmarks/llamacpp.py; llamacpp extra)

        llamacpp(models)
        llamacpp_default()
    if args.stage in ("all", "precision"):
        from precision import precision  # noqa: E402  (benchmarks/precision.py)

        precision(limits.get("smollm2-135m", 250))
    if args.stage in ("all", "short-prompts"):
        from shortprompts import shortprompts  # noqa: E402  (benchmarks/shortprompts.py)

        shortprompts(models)
    if args.stage in ("all", "scorer"):
        from scorer import scorer  # noqa: E402  (benchmarks/scorer.py)

        scorer(models, args.scorer_limit)
    if args.stage in ("all", "render"):
        from render import render  # noqa: E402  (benchmarks/render.py)

        render()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())

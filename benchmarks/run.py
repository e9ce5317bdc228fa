"""Reproduce SEAP's accuracy and speed tables on the bundled models; writes benchmarks/RESULTS.md.

    python benchmarks/run.py                      # everything (cached results are reused)
    python benchmarks/run.py --stage accuracy     # or: routing, speed, xsum, griffin-speed, precision,
                                                  #     short-prompts, render
    python benchmarks/scaling.py                  # cost at 135M-8B on random-weight checkpoints (separate)
    python benchmarks/calibration.py              # calibration size and source curve (separate)
    python benchmarks/unknown_prompts.py          # routed vs generic expert on unseen prompt kinds (separate)

Each (model, method, ratio) result is a JSON file under benchmarks/results/, written when it
finishes, so an interrupted run resumes where it stopped; `render` rebuilds RESULTS.md and the
plot from those files. Calibration statistics are cached in benchmarks/.cache (ignored by git).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the stage modules beside this file

from common import (CONFIGS, DATA, EXTRA_CONFIGS, MODELS, PAPER_CONFIGS, RATIOS, RECON_CONFIGS,  # noqa: E402
                    REFERENCE_CONFIGS)


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
    ap.add_argument("--rows", default=None, help="xsum, accuracy, reconstruction and routing stages: only these rows "
                    "(comma-separated full names, e.g. 'magnitude 0.75,GRIFFIN 0.75'; in all but the xsum stage, names that hold commas "
                    "themselves work too), so that a second process can share the work")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not DATA.is_dir():
        print(f"benchmarks need ../shared/data (looked in {DATA})", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    limits = {k: int(v) for k, v in (kv.split("=") for kv in args.limit.split(","))}
    def named(row: str) -> bool:  # --rows: full row names separated by commas; a name may hold commas itself
        return not args.rows or f",{row}," in f",{args.rows},"

    def chosen(configs):
        return [r for r in configs if named(r[0])]

    from accuracy import accuracy  # noqa: E402  (benchmarks/accuracy.py)

    if args.stage in ("all", "accuracy"):
        rows = chosen(CONFIGS + (EXTRA_CONFIGS if args.extra else ()))
        accuracy(models, limits, args.extra, tuple(float(r) for r in args.ratios.split(",")), rows,
                 dense=named("dense"))
    if args.stage in ("all", "reconstruction"):
        accuracy(models, limits, False, tuple(float(r) for r in args.ratios.split(",")), chosen(RECON_CONFIGS),
                 dense=False)
    if args.stage in ("all", "paper-protocol"):
        accuracy(models, limits, False, tuple(float(r) for r in args.ratios.split(",")), PAPER_CONFIGS, dense=False)
        accuracy(models, limits, False, (0.5,), REFERENCE_CONFIGS, dense=False)
    if args.stage in ("all", "routing"):
        from routing import ROUTED_ROWS, routing  # noqa: E402  (benchmarks/routing.py)

        routing(models, limits, tuple(float(r) for r in args.ratios.split(",")), chosen(ROUTED_ROWS))
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
    raise SystemExit(main())

"""The one-pass engine's default against the two-pass default it replaced, on the bundled models.

    git worktree add /tmp/seap-before 12e0baf
    python benchmarks/engine_equivalence.py --before /tmp/seap-before --out benchmarks/results/engine_equivalence.json

For each bundled model and ratio, `seap prune` (the `seap` preset: logistic widths, reconstruction
with the OBS choice, the embedded corpus) runs once with the code before the engine (its src/ on
PYTHONPATH) and once with this checkout, and the two plans are compared: per-layer widths, the
share of kept channels in common, the largest relative difference of the refitted output weights
over layers whose channels agree, and the model-wide refit error. Same channels and weights equal to
float32 rounding mean the same pruned model, so the six-task accuracy of the committed default rows
stands for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prune(src: Path, model: str, ratio: float, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "seap", "prune", "--model", model, "--ratio", str(ratio), "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    return time.time() - t0


def compare(a: Path, b: Path) -> dict:
    import torch

    from seap import Plan

    pa, pb = Plan.load(a / "plan"), Plan.load(b / "plan")
    ea, eb = pa.experts[pa.meta.default_expert], pb.experts[pb.meta.default_expert]
    kept = sum(len(x) for x in ea.ffn)
    shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ea.ffn, eb.ffn))
    diffs = []
    for x, y, wx, wy in zip(ea.ffn, eb.ffn, ea.ffn_out, eb.ffn_out):
        if torch.equal(x, y) and wx is not None and wy is not None:
            diffs.append(float((wx.double() - wy.double()).norm() / wx.double().norm().clamp_min(1e-30)))
    err = {k: sum(e.stats["reconstruction"]["ffn_error"]["refit"]) / sum(e.stats["reconstruction"]["ffn_error"]["none"])
           for k, e in (("before", ea), ("engine", eb))}
    return {"same_widths": ea.widths() == eb.widths(), "channels_shared": shared / kept,
            "layers_with_identical_channels": sum(torch.equal(x, y) for x, y in zip(ea.ffn, eb.ffn)),
            "layers": len(ea.ffn), "max_rel_weight_diff_same_channels": max(diffs) if diffs else None,
            "refit_over_cut": err}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the code before the engine")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                a, b = Path(tmp) / f"{model}-{ratio}-before", Path(tmp) / f"{model}-{ratio}-engine"
                ta = prune(Path(args.before) / "src", model, ratio, a)
                tb = prune(ROOT / "src", model, ratio, b)
                row = {"model": model, "ratio": ratio, "seconds_before": round(ta, 1), "seconds_engine": round(tb, 1),
                       **compare(a, b)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

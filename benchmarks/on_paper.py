"""A geometry too big for this machine's disk, on paper: seap's own estimate of the default prune.

    python benchmarks/on_paper.py                      # llama-3.1-70b and, as a check, llama-3.1-8b
    python benchmarks/on_paper.py --models llama-3.1-70b --processes 1,8

The numbers are what `seap prune --model CKPT --ratio 0.5 --out OUT` prints before its calibration pass
(seap.calibration.estimate), computed here without a checkpoint: the model is a skeleton on the meta device with the
published geometry (benchmarks/checkpoints.py), the calibration batches are the default corpus encoded by
the checkpoints' tokenizer, the widths are the `seap` preset's logistic schedule at 50%, and the rates are
this machine's float32 / float64 matrix products, timed now. For N processes (torchrun) each process
runs the forward of its share of the texts; every process makes the same decision on the all-reduced
Gram matrices, so that part does not shrink. The 8B row stands beside its measured run
(benchmarks/results/scaling-default/llama-3.1-8b.json) to show how far to trust the 70B one.
Results: benchmarks/results/on_paper.json and a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkpoints import config_for, real_tokenizer  # noqa: E402

RESULT = HERE / "results" / "on_paper.json"
MEASURED = HERE / "results" / "scaling-default"


def on_paper(name: str, processes: int = 1, ratio: float = 0.5) -> dict:
    """The default prune's estimate (per stage seconds, peak bytes by part) for `name`'s geometry."""
    from seap import CalibrationData, PruneConfig
    from seap.calibration.estimate import model_estimate
    from seap.calibration.layerwise import encode_corpora
    from seap.calibration.stats import position_limit
    from seap.model.adapters import get_adapter
    from seap.model.skeleton import empty_model
    from seap.pruning.plan import experts_of, fixed_widths, resolve_head_unit
    from seap.pruning.refit_pass import expert_refit
    from seap.tasks import resolve_corpus

    cfg = PruneConfig.from_method("seap", ratio=ratio)
    data = CalibrationData()
    skeleton = empty_model(config_for(name), torch.float32)
    adapter = get_adapter(skeleton)
    head_unit = resolve_head_unit(cfg, adapter, skeleton)
    kept, _ = fixed_widths(cfg, adapter, skeleton, head_unit)
    d_ff = [adapter.d_ff(layer) for layer in adapter.layers(skeleton)]
    corpora = {t: resolve_corpus(t, seed=cfg.seed).texts for t in data.tasks}
    # one process's share: every processes-th text (seap.calibration.distributed.share deals them out round-robin)
    share = {t: [x for x in texts if x and x.strip()][::processes] for t, texts in corpora.items()}
    enc, _, _ = encode_corpora(real_tokenizer(), share, data.batch_size,
                               position_limit(skeleton.config, data.max_length))
    experts = experts_of(cfg, data.tasks)
    obs = any(expert_refit(cfg.refit, n).choice == "obs" for n in experts)  # the default's choice for its experts
    est = model_estimate(adapter, skeleton, enc, kept, [k == c for k, c in zip(kept, d_ff)],
                         groups=len(experts), obs=obs, sequential=False, streamed=True,
                         dtype=torch.float32, device=torch.device("cpu"))
    params = sum(p.numel() for p in skeleton.parameters())
    return {"model": name, "processes": processes, "tokens_per_process": sum(int(b["attention_mask"].sum()) for b in enc),
            "params": params, "d_ff": max(d_ff), "hidden": skeleton.config.hidden_size,
            "layers": len(d_ff), "bf16_checkpoint_gb": params * 2 / 1e9,
            "seconds": {k: round(v, 1) for k, v in est.seconds.items()}, "total_s": round(sum(est.seconds.values()), 1),
            "peak": est.peak, "peak_gib": est.peak_bytes / 2 ** 30, "line": est.line()}


def paper_section() -> str:
    if not RESULT.is_file():
        return ""
    rows = json.loads(RESULT.read_text())["rows"]
    text = ("\n### Bigger than this disk: the default prune on paper\n\n`python benchmarks/on_paper.py`: seap's own "
            "estimate (what `seap prune` prints before its calibration pass) from the published geometry, the "
            "default corpus and this machine's matrix-product rates, float32 on 2 CPU cores. Per process under "
            "torchrun the forward shrinks with the texts; the decision (Gram, OBS, refit) is made whole on every "
            "process. The peak is the largest of three phases (a layer's batches, its decision, the save after the "
            "pass): a layer's at 8B, whatever the depth; at 70B the save's, while the plan holds every layer's refitted "
            "output weights.\n\n"
            "| geometry | processes | tokens / process | forward | Gram | OBS choice | refit + errors | total | "
            "peak (its largest part) | measured |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        s, m = r["seconds"], r.get("measured") or {}
        part, size = max(r["peak"].items(), key=lambda kv: kv[1])
        meas = (f"{m['wall_s'] / 60:.1f} min, {m['peak_rss_gb']:.2f} GiB" if m else "—")
        text += (f"| {r['model']} | {r['processes']} | {r['tokens_per_process']:,} | {s['forward'] / 60:.0f} min | "
                 f"{s['Gram matrices'] / 60:.0f} min | {s['OBS choice'] / 60:.0f} min | "
                 f"{(s['refit'] + s['errors']) / 60:.0f} min | {r['total_s'] / 3600:.1f} h | "
                 f"{r['peak_gib']:.1f} GiB ({part} {size / 2 ** 30:.1f} GiB) | {meas} |\n")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.1-8b,llama-3.1-70b")
    ap.add_argument("--processes", default="1,8", help="torchrun processes (comma-separated)")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        for n in (int(p) for p in args.processes.split(",")):
            row = on_paper(name, n)
            measured = MEASURED / f"{name}.json"
            if n == 1 and measured.is_file():
                m = json.loads(measured.read_text())
                row["measured"] = {"wall_s": m["wall_s"], "peak_rss_gb": m["peak_rss_gb"],
                                   "calibration_seconds": m["calibration"]["seconds"]}
            print(f"{name} x{n}: {row['line']}")
            rows.append(row)
    RESULT.write_text(json.dumps({"command": "python benchmarks/on_paper.py " + " ".join(sys.argv[1:]),
                                  "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

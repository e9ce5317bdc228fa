"""The GPU check: seap's default prune of an 8B-geometry checkpoint on CUDA, and decoding dense against 50%.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json            # on a lent GPU (under 8 minutes)
    python benchmarks/gpu_check.py --geometry tiny --device cpu --no-compile --out /tmp/gc.json   # CPU rehearsal

Steps, each timed: (1) write a seeded random-weight bf16 checkpoint of the geometry on the machine
(benchmarks/checkpoints.py: only the script travels); (2) `seap.prune` with the default (`seap`, 50%,
reconstruction with the OBS choice) on the device in bf16, layer by layer, with the time of each stage
from its summary; (3) decode with a static KV cache (and torch.compile unless --no-compile), dense
against the pruned folder, at batch 1 and 16: tokens per second and the ratio pruned / dense next to
the ratio of weight bytes (the limit for a memory-bound decode). Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import GEOMETRIES, write_checkpoint  # noqa: E402

# 12 layers: the `seap` preset keeps 2 + 2 dense and reaches 50% only with enough layers between them
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(model, device: torch.device, batch: int, prompt_len: int, gen_len: int, repeats: int,
                 compile_: bool) -> dict:
    """Median decode tokens per second (generate with a static cache, greedy, prompt excluded)."""
    from transformers import GenerationConfig

    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 32000), (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    gen = GenerationConfig(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                           cache_implementation="static", pad_token_id=0)
    if compile_:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    prefill = GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=False, cache_implementation="static",
                               pad_token_id=0)
    times = []
    for r in range(repeats + 2):  # two warm-ups: compilation and cache allocation
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, generation_config=prefill)
        _sync(device)
        t1 = time.perf_counter()
        model.generate(ids, generation_config=gen)
        _sync(device)
        t2 = time.perf_counter()
        if r >= 2:
            times.append((t2 - t1) - (t1 - t0))  # the decode steps alone: the whole run less one prefill
    per = statistics.median(times)
    return {"batch": batch, "decode_tokens_per_s": round(batch * (gen_len - 1) / max(per, 1e-9), 1),
            "seconds": [round(t, 4) for t in times]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="llama-3.1-8b", choices=[*sorted(GEOMETRIES), "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/seap-gpu-check")
    ap.add_argument("--out", required=True, help="the JSON file of results")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="calibration texts (default: the whole embedded corpus)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    import checkpoints

    from seap import CalibrationData, PruneConfig, Runtime, prune

    if args.geometry == "tiny":
        checkpoints.GEOMETRIES["tiny"] = TINY
    device = torch.device(args.device)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict = {"geometry": args.geometry, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__}
    t0 = time.time()
    ckpt = write_checkpoint(args.geometry, work / "ckpt")
    result["write_checkpoint_s"] = round(time.time() - t0, 1)
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    t0 = time.time()
    res = prune(str(ckpt), PruneConfig.from_method("seap", ratio=args.ratio),
                CalibrationData(limit=args.limit), work / "pruned",
                runtime=Runtime(device=args.device, dtype=dtype, load="layerwise"), progress=False)
    s = res.summary()
    result["prune"] = {"seconds": round(time.time() - t0, 1), "stage_seconds": s["stage_seconds"],
                       "calibration": s["calibration"], "achieved_ratio": s["achieved_ratio"],
                       "params_before": s["params_before"], "params_after": s["params_after"],
                       "bytes_written": s["bytes_written"],
                       "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    print(json.dumps(result["prune"], indent=1), flush=True)

    from transformers import AutoModelForCausalLM

    from seap.model.pruned_folder import load_pruned

    torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = {}
    for name in ("dense", "pruned"):
        if name == "dense":
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype).to(device).eval()
        else:
            model = load_pruned(work / "pruned" / "model", torch_dtype, device=device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rows[name] = {"weight_bytes": weight_bytes, "runs": []}
        with torch.inference_mode():
            for b in (int(x) for x in args.batches.split(",")):
                rows[name]["runs"].append(decode_speed(model, device, b, args.prompt_len, args.gen_len, args.repeats,
                                                       not args.no_compile))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["decode"] = rows
    result["decode_ratio"] = [
        {"batch": d["batch"], "pruned_over_dense": round(p["decode_tokens_per_s"] / d["decode_tokens_per_s"], 3),
         "bytes_limit": round(rows["dense"]["weight_bytes"] / rows["pruned"]["weight_bytes"], 3)}
        for d, p in zip(rows["dense"]["runs"], rows["pruned"]["runs"])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["decode_ratio"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

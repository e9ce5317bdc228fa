"""llama.cpp stage of benchmarks/run.py: pruned models exported to GGUF, checked and timed in llama.cpp.

Per model, one pruned row that llama.cpp can hold: SmolLM2 with SEAP's generic expert at 50%
(logistic per-layer widths, rounded to multiples of 32 so that Q8_0 covers every matrix; written
as the `deci` architecture), Gemma 3 with WandA-sp at 50% (uniform widths: llama.cpp's gemma3
reads one FFN width). Two results per model, cached apart:

- llamacpp_check.json: the F32 export's next-token logits in llama.cpp against the transformers
  model on the first 500 WikiText-2 test tokens (top-1 agreement, max |difference|);
- llamacpp_speed.json: dense and pruned exported at the same type (Q8_0, and Q4_K_M through
  llama.cpp's quantizer), prefill and decode tokens/s at batch 1 in one process, interleaved repeats.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from pathlib import Path

from common import CACHE, DATA, RESULTS, plan_for, stats_for, write

log = logging.getLogger("benchmarks.llamacpp")

PRUNED = {  # model -> (row, method, protocol, extra PruneConfig settings)
    "smollm2-135m": ("SEAP-gen 50% (multiple 32)", "seap-paper", "generic", {"multiple": 32}),
    "gemma3-270m": ("WandA-sp 50%", "wanda-sp", "all", {}),
}
CHECK_TOKENS = 500
QUANTS = ("q8_0", "q4_k_m")
REPEATS = {"smollm2-135m": 7, "gemma3-270m": 5}


def _pruned(lm, model_name: str):
    from seap.pruning.surgery import sliced

    row, method, protocol, extra = PRUNED[model_name]
    plan = plan_for(lm, stats_for(lm, model_name), method, 0.5, protocol, extra)
    return row, sliced(lm, plan, "generic" if protocol == "generic" else None)


def llamacpp(models: list[str], parts: tuple[str, ...] = ("check", "speed")) -> None:
    from seap.export import GGUFConfig, export_gguf, export_model
    from seap.export.llamacpp import bench_gguf, speed_rows, tensor_types
    from seap.model.loading import load_model

    for model_name in models:
        check_path = RESULTS / model_name / "llamacpp_check.json"
        speed_path = RESULTS / model_name / "llamacpp_speed.json"
        todo = [p for p, path in (("check", check_path), ("speed", speed_path)) if p in parts and not path.is_file()]
        if not todo:
            continue
        lm = load_model(model_name)
        row, pruned = _pruned(lm, model_name)
        widths = [pruned.adapter.d_ff(layer) for layer in pruned.adapter.layers(pruned.model)]
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            work = Path(work)
            if "check" in todo:
                t0 = time.time()
                rep = export_model(pruned, work / "pruned.f32.gguf", check=CHECK_TOKENS, data_dir=DATA)
                write(check_path, {"model": model_name, "row": row, "ffn_widths": widths, **rep,
                                    "seconds": round(time.time() - t0, 1)})
                log.info("%s check: top-1 %.4f, max diff %.3g", model_name, rep["check"]["top1_agreement"],
                         rep["check"]["max_abs_diff"])
            if "speed" in todo:
                runs = {}
                for quant in QUANTS:
                    paths = {"dense": export_gguf(lm, work / f"dense.{quant}.gguf", GGUFConfig(out_type=quant)).path,
                             row: export_gguf(pruned, work / f"pruned.{quant}.gguf", GGUFConfig(out_type=quant)).path}
                    types = {n: tensor_types(p) for n, p in paths.items()}
                    t0 = time.time()
                    speeds = bench_gguf(paths, prompt_len=128, gen_len=64, warmup=1,
                                        repeats=REPEATS.get(model_name, 5))
                    runs[quant] = {"rows": speed_rows(speeds, "dense"), "tensor_types": types,
                                   "seconds": round(time.time() - t0, 1)}
                    log.info("%s %s: decode x%.2f", model_name, quant, runs[quant]["rows"][1]["decode_ratio"])
                write(speed_path, {"model": model_name, "row": row, "ffn_widths": widths,
                                    "config": {"prompt_len": 128, "gen_len": 64, "warmup": 1, "batch": 1,
                                               "repeats": REPEATS.get(model_name, 5), "repack": False},
                                    "runs": runs})
        del lm, pruned
        gc.collect()


DEFAULT_CMD = "seap prune --ratio 0.5"


def llamacpp_default(model_name: str = "smollm2-135m") -> None:
    """What a user gets by default: `seap prune --ratio 0.5` (SEAP on the embedded corpus, widths
    multiples of 32) exported to Q8_0 and timed against dense in llama.cpp, as the speed rows above."""
    from seap import prune
    from seap.export import benchmark_gguf
    from seap.export.llamacpp import tensor_types

    path = RESULTS / model_name / "llamacpp_default.json"
    if path.is_file():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        work = Path(work)
        res = prune(model_name, out=work / "seap-out", progress=False)
        t0 = time.time()
        rows = benchmark_gguf(model_name, compare=[str(work / "seap-out" / "model")], quant="q8_0", prompt_len=128,
                              gen_len=64, warmup=1, repeats=REPEATS.get(model_name, 5), out=work / "bench",
                              progress=False)
        types = {p.stem: tensor_types(p) for p in (work / "bench" / "gguf").glob("*.gguf")}
        write(path, {"model": model_name, "command": DEFAULT_CMD, "ffn_widths": res.widths,
                      "config": res.plan.meta.config, "rows": rows, "tensor_types": types,
                      "seconds": round(time.time() - t0, 1)})
        log.info("%s default prune: Q8_0 decode x%.2f", model_name, rows[1]["decode_ratio"])


def llamacpp_section(model: str) -> str:
    """RESULTS.md text: the llama.cpp check and speed of one model (empty when not run)."""
    import json

    text = ""
    check = RESULTS / model / "llamacpp_check.json"
    if check.is_file():
        c = json.loads(check.read_text())
        k = c["check"]
        text += (f"\nllama.cpp (llama-cpp-python, F32 GGUF, architecture `{c['arch']}`) against transformers, "
                 f"{c['row']}, next-token logits on the first {k['positions']} WikiText-2 test tokens: top-1 "
                 f"agreement **{100 * k['top1_agreement']:.2f}%**, max |logit difference| {k['max_abs_diff']:.3g} "
                 f"(mean {k['mean_abs_diff']:.2g}; logits reach {k['max_abs_logit']:.1f}).\n")
    speed = RESULTS / model / "llamacpp_speed.json"
    if speed.is_file():
        s = json.loads(speed.read_text())
        cfg = s["config"]
        text += (f"\nllama.cpp speed (`seap bench --backend llamacpp`: dense and pruned exported at the same type, "
                 f"batch 1, prompt {cfg['prompt_len']} random tokens, {cfg['gen_len']} generated, warm-up "
                 f"{cfg['warmup']}, median of {cfg['repeats']} interleaved repeats, 2 threads, repacked weight "
                 "buffers off; the limit is the ratio of file bytes):\n\n"
                 "| type | model | GGUF MB | tensor types | prefill tok/s | decode tok/s | prefill × | decode × | "
                 "bytes limit × |\n|---|---|---|---|---|---|---|---|---|\n")
        for quant, run in s["runs"].items():
            for r in run["rows"]:
                types = ", ".join(f"{n} {t}" for t, n in run["tensor_types"][r["model"]].items())
                text += (f"| {quant} | {r['model']} | {r['file_MB']:.0f} | {types} | {r['prefill_tok_s']:.0f} | "
                         f"{r['decode_tok_s']:.1f} | {r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | "
                         f"{r['bytes_limit']:.2f} |\n")
    default = RESULTS / model / "llamacpp_default.json"
    if default.is_file():
        d = json.loads(default.read_text())
        r = d["rows"][1]
        f16 = sum(t.get("F16", 0) for t in d["tensor_types"].values())
        widths = d["ffn_widths"]
        text += (f"\nThe default prune (`{d['command']}`: SEAP on the embedded corpus, widths multiples of "
                 f"{d['config']['multiple']}, {min(widths)}–{max(widths)}) in llama.cpp Q8_0, timed the same way: "
                 f"decode {r['decode_tok_s']:.1f} tok/s, **{r['decode_ratio']:.2f}×** dense (bytes limit "
                 f"{r['bytes_limit']:.2f}×); {f16} tensors left in F16.\n")
    return text

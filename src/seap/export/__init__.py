"""Exports that runtimes load (docs/design.md §3): GGUF for llama.cpp, DeciLM block configs for vLLM.

`export_model` and `benchmark_gguf` are what `seap export` and `seap bench --backend llamacpp` run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from .._io import write_json, write_text
from ..errors import ConfigError, DataError
from ..model.loading import LoadedModel, is_open, use_or_open
from ..pruning.surgery import plan_and_expert, sliced
from .gguf import OUT_TYPES, GGUFConfig, GGUFExport, export_gguf
from .source import ExportSource, open_source
from .vllm import VLLMExport, export_vllm

log = logging.getLogger(__name__)

FORMATS = ("gguf", "vllm")


def check_text_tokens(lm: LoadedModel | ExportSource, n: int, data_dir: str | Path | None) -> tuple[list[int], str]:
    """The first n tokens of WikiText-2 test (or of the embedded general text without data)."""
    from ..evaluation.perplexity import wikitext_stream
    from ..tasks import resolve_corpus

    try:
        text, source = wikitext_stream(data_dir)
    except (DataError, OSError) as err:
        if data_dir is not None:
            raise
        log.info("no WikiText-2 (%s): checking on the embedded general text", err)
        corpus = resolve_corpus("default:general_text")
        text, source = "\n\n".join(corpus.texts), corpus.source
    ids = lm.tokenizer(text[: 40 * n], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise DataError(f"{source} gives only {len(ids)} tokens, fewer than the {n} asked for: lower --check")
    return list(ids[:n]), source


def export_model(model: str | LoadedModel | None, out: str | Path, *, fmt: str = "gguf", plan=None,
                 expert: str | None = None, out_type: str = "f32", tokenizer_from: str | None = None,
                 tensor_parallel: int = 1, check: int = 0, data_dir: str | Path | None = None,
                 progress: bool = True, runtime=None, wait: bool = False) -> dict:
    """Export a model (a pruned folder, or a base model with `plan`) for llama.cpp or vLLM.

    A safetensors folder (pruned, or a base checkpoint cut by `plan`) is streamed from its shards,
    one decoder layer in memory at a time; a LoadedModel, a GGUF or a bundled model is exported
    from memory, and so is any model with `check` or `--load whole` (the check runs it whole).
    With `check` > 0 (GGUF only), llama.cpp's next-token logits on the first `check` WikiText-2
    tokens are compared with the transformers model; the result is saved next to the file.
    The output is written as one artifact (seap.outputs): a vLLM folder with its manifest last, a GGUF
    file renamed into place; locked meanwhile (`wait`: wait for another run instead of refusing)."""
    from ..outputs import locked, output_folder

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    if check < 0:
        raise ConfigError(f"--check must be >= 0 tokens, got {check}")
    if check and fmt == "vllm":
        raise ConfigError("--check compares llama.cpp logits: it applies to --format gguf")
    if fmt == "gguf" and Path(out).suffix != ".gguf":
        raise ConfigError(f"the GGUF output must end in .gguf, got {out}")
    if fmt == "vllm":
        with output_folder(out, "seap export", None, wait=wait) as output:
            src = _source(model, runtime, plan, expert, check)
            output.begin()
            res = export_vllm(src, out, tensor_parallel=tensor_parallel, progress=progress)
            output.commit()
        return {"format": fmt, **res.to_dict()}
    with locked(out, "seap export", wait=wait):
        return _export_gguf(model, out, plan, expert, out_type, tokenizer_from, check, data_dir, progress, runtime)


def _source(model, runtime, plan, expert, check: int) -> ExportSource:
    """What is exported: streamed from a safetensors folder where it can be, else a model in memory."""
    src = None
    if not is_open(model) and not check:
        src = open_source(model, runtime, plan, expert)
    if src is None:
        lm = use_or_open(model, runtime)
        if plan is not None:
            lm = sliced(lm, plan, expert)
        src = ExportSource.of(lm)
    return src


def _export_gguf(model, out, plan, expert, out_type: str, tokenizer_from, check: int, data_dir, progress: bool,
                 runtime) -> dict:
    src = _source(model, runtime, plan, expert, check)
    res = export_gguf(src, out, GGUFConfig(out_type=out_type, tokenizer_from=tokenizer_from), progress=progress)
    report = {"format": "gguf", **res.to_dict()}
    if check:  # `check` made _source load the model whole: src.model computes, src.tokenizer encodes
        from .llamacpp import compare_logits

        tokens, source = check_text_tokens(src, check, data_dir)
        t0 = time.time()
        report["check"] = {**compare_logits(src.model, res.path, tokens).to_dict(), "text": source,
                           "seconds": round(time.time() - t0, 1)}
        write_json(Path(out).with_suffix(".json"), report)
    return report


def benchmark_gguf(model: str | LoadedModel | None = None, *, compare: Sequence[str] = (),
                   plans: Sequence[str] = (), quant: str = "q8_0", prompt_len: int = 128, gen_len: int = 64,
                   warmup: int = 1, repeats: int = 5, out: str | Path = "seap-bench",
                   progress: bool = True, runtime=None) -> list[dict]:
    """`seap bench --backend llamacpp`: the dense model and each pruned model exported to GGUF at the
    same quantisation (files given as .gguf are used as they are), timed in llama.cpp in one run."""
    from .llamacpp import bench_gguf, require, speed_markdown, speed_rows

    require()
    if quant not in OUT_TYPES:
        raise ConfigError(f"unknown GGUF type {quant!r}: choose one of {', '.join(OUT_TYPES)}")
    out = Path(out)
    paths: dict[str, Path] = {}

    def add(name: str, spec) -> None:
        if isinstance(spec, str) and spec.endswith(".gguf"):
            paths[name] = Path(spec)
            return
        paths[name] = export_gguf(spec, out / "gguf" / f"{_slug(name)}.{quant}.gguf", GGUFConfig(out_type=quant),
                                  progress=progress, runtime=runtime).path  # a folder streams from its shards

    base = model if model and not is_open(model) and str(model).endswith(".gguf") else use_or_open(model, runtime)
    add("dense", base)
    for path in compare:
        add(Path(path).stem if str(path).endswith(".gguf") else Path(path).name, str(path))
    for spec in plans:
        if not is_open(base):
            raise ConfigError("--plan needs the base model as --model (a bundled name, folder or hub id), not a .gguf")
        plan, expert = plan_and_expert(spec)
        name, _ = plan.expert(expert)
        add(f"{plan.meta.label}:{name}", sliced(base, plan, name))
    speeds = bench_gguf(paths, prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, repeats=repeats)
    rows = speed_rows(speeds, "dense")
    config = {"backend": "llamacpp", "quant": quant, "prompt_len": prompt_len, "gen_len": gen_len,
              "warmup": warmup, "repeats": repeats, "batch": 1}
    write_json(out / "bench.json", {"config": config, "rows": rows})
    write_text(out / "bench.md", f"# seap bench (llama.cpp, {quant}, batch 1)\n\n" + speed_markdown(rows))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


__all__ = ["FORMATS", "OUT_TYPES", "ExportSource", "GGUFConfig", "benchmark_gguf", "export_gguf", "export_model",
           "export_vllm", "open_source"]

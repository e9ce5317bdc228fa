"""llama.cpp through llama-cpp-python (the optional `llamacpp` extra): quantise exported GGUF
files, check their logits against the transformers model, and time dense against pruned.

llama-cpp-python builds llama.cpp from source (about 10 minutes on 2 cores), so everything here
imports it lazily and says how to install it when it is missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

INSTALL = ("pip install 'seap[llamacpp]' (or pip install llama-cpp-python; it builds llama.cpp from source, "
           "about 10 minutes on 2 cores)")
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require():
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"llama.cpp is not installed: {INSTALL}") from None
    return llama_cpp


def quantize(src: str | Path, dst: str | Path, out_type: str) -> dict[str, int]:
    """llama.cpp's quantizer (llama-quantize's library call); returns tensor counts by type.

    K-quants need rows that are multiples of 256; llama.cpp falls back to another type for the
    tensors that are not (prune with --multiple 256 to avoid that)."""

    lc = require()
    if out_type not in QUANT_FTYPES:
        raise ConfigError(f"llama.cpp quantisation to {out_type!r} is not offered: choose {', '.join(QUANT_FTYPES)}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, QUANT_FTYPES[out_type])
    params.nthread = os.cpu_count() or 1
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantise {src} to {out_type} (code {rc})")
    return tensor_types(dst)


@contextmanager
def _model_params(repack: bool) -> Iterator[None]:
    """llama-cpp-python builds its model parameters from the library defaults and has no argument
    for `use_extra_bufts` (llama.cpp's --no-repack): swap the defaults while a model loads."""
    import llama_cpp.llama as high

    base = high.llama_cpp.llama_model_default_params

    def params():
        p = base()
        p.use_extra_bufts = repack
        return p

    high.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = base


@contextmanager
def llama(path: str | Path, *, n_ctx: int = 2048, logits_all: bool = False, threads: int | None = None,
          repack: bool = False) -> Iterator:
    """A llama.cpp model and context; freed on exit.

    `repack` (llama.cpp's extra weight buffers: repacked and AMX layouts) is off by default: on a
    virtualised Sapphire Rapids CPU that advertises AMX, llama.cpp 0.3.36's AMX path crashed in the
    first quantised matmul. Dense and pruned files are timed with the same setting."""
    lc = require()
    threads = threads or os.cpu_count() or 1
    try:
        with _model_params(repack):
            model = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                             n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise ModelError(f"llama.cpp could not load {path}: {err}") from None
    try:
        yield model
    finally:
        model.close()


# -- agreement ------------------------------------------------------------------------------------
@dataclass
class Agreement:
    positions: int
    top1_agreement: float  # share of positions whose argmax token is the same
    max_abs_diff: float  # over all positions and vocabulary entries
    mean_abs_diff: float
    max_abs_logit: float  # scale of the logits, for reading the differences

    def to_dict(self) -> dict:
        return asdict(self)


def gguf_logits(path: str | Path, tokens: Sequence[int]) -> np.ndarray:
    """[len(tokens), vocab] next-token logits of llama.cpp on one sequence."""
    with llama(path, n_ctx=max(len(tokens), 16), logits_all=True) as m:
        m.eval(list(tokens))
        return np.array(m.scores[:len(tokens)], dtype=np.float32)


@torch.inference_mode()
def compare_logits(hf_model, path: str | Path, tokens: Sequence[int]) -> Agreement:
    """Next-token logits of the transformers model against the GGUF in llama.cpp, position by position."""
    ref = hf_model(torch.tensor([list(tokens)])).logits[0].float().numpy()
    got = gguf_logits(path, tokens)
    if got.shape != ref.shape:
        raise ModelError(f"llama.cpp gives logits of shape {got.shape}, transformers {ref.shape}: the GGUF does not "
                         "match this model")
    diff = np.abs(got - ref)
    return Agreement(len(tokens), float((got.argmax(-1) == ref.argmax(-1)).mean()), float(diff.max()),
                     float(diff.mean()), float(np.abs(ref).max()))


# -- speed ----------------------------------------------------------------------------------------
@dataclass
class LlamaCppSpeed:
    name: str
    path: str
    file_bytes: int
    prefill_tok_s: float
    decode_tok_s: float
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)


def _greedy(m, lc, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of greedy decoding: one eval of the prompt, then one token per eval."""
    m.reset()
    n_vocab = m.n_vocab()
    t0 = time.perf_counter()
    m.eval(prompt)
    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(m._ctx.ctx, -1), shape=(n_vocab,))
    nxt = int(logits.argmax())
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        m.eval([nxt])
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(m._ctx.ctx, -1), shape=(n_vocab,))
        nxt = int(logits.argmax())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench_gguf(paths: dict[str, str | Path], *, prompt_len: int = 128, gen_len: int = 64, warmup: int = 1,
               repeats: int = 5, seed: int = 0, threads: int | None = None,
               repack: bool = False) -> dict[str, LlamaCppSpeed]:
    """Prefill and decode tokens/s (batch 1) of GGUF files in llama.cpp, all loaded at once and timed
    in interleaved repeats so that drift of the machine hits every file alike."""
    lc = require()
    if not paths:
        raise ConfigError("nothing to benchmark: give at least one GGUF file")
    if gen_len < 2 or prompt_len < 1 or repeats < 1:
        raise ConfigError("prompt length >= 1, generation length >= 2 and repeats >= 1 are needed")
    runs: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in paths}
    with _all(paths, prompt_len + gen_len + 8, threads, repack) as models:
        vocab = min(m.n_vocab() for m in models.values())
        for r in range(warmup + repeats):
            g = np.random.default_rng(seed + r)
            prompt = [int(x) for x in g.integers(min(1000, vocab // 2), vocab, prompt_len)]
            for name, m in models.items():
                tp, td = _greedy(m, lc, prompt, gen_len)
                if r >= warmup:
                    runs[name][0].append(tp)
                    runs[name][1].append(td)
    return {n: LlamaCppSpeed(n, str(p), Path(p).stat().st_size, prompt_len / statistics.median(runs[n][0]),
                             (gen_len - 1) / statistics.median(runs[n][1]), *runs[n]) for n, p in paths.items()}


@contextmanager
def _all(paths: dict[str, str | Path], n_ctx: int, threads: int | None, repack: bool):
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {n: stack.enter_context(llama(p, n_ctx=n_ctx, threads=threads, repack=repack)) for n, p in paths.items()}


def speed_rows(speeds: dict[str, LlamaCppSpeed], reference: str | None = None) -> list[dict]:
    """Rows with tokens/s and ratios to the reference (the dense file) and the bytes limit."""
    reference = reference or next(iter(speeds))
    ref = speeds[reference]
    return [{"model": s.name, "file_MB": s.file_bytes / 2**20, "prefill_tok_s": s.prefill_tok_s,
             "decode_tok_s": s.decode_tok_s, "prefill_ratio": s.prefill_tok_s / ref.prefill_tok_s,
             "decode_ratio": s.decode_tok_s / ref.decode_tok_s, "bytes_limit": ref.file_bytes / s.file_bytes,
             "prefill_runs": s.prefill_runs, "decode_runs": s.decode_runs, "path": s.path} for s in speeds.values()]


def speed_markdown(rows: Sequence[dict]) -> str:
    head = ("model", "GGUF MB", "prefill tok/s", "decode tok/s", "prefill ×", "decode ×", "file bytes limit ×")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['file_MB']:.0f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {r['bytes_limit']:.2f} |")
    return "\n".join(lines) + "\n"


def tensor_types(path: str | Path) -> dict[str, int]:
    """ggml type name -> count of tensors in a GGUF file."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts

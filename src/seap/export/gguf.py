"""GGUF export for llama.cpp (docs/design.md §3): pruned models with uniform or per-layer widths.

llama.cpp's `llama` architecture reads one `feed_forward_length` for all layers, so per-layer
widths (and per-layer head counts) are written under the `deci` architecture, whose loader builds
every layer from `feed_forward_length` / `attention.head_count(_kv)` arrays. Gemma 3 is written
as `gemma3` (uniform widths only: its loader has no per-layer FFN length).

Tensors are mapped to llama.cpp names with the gguf package's TensorNameMap. Two transforms undo
what transformers' GGUF reader and the Hugging Face layout changed: Llama's q/k rows are permuted
back to llama.cpp's interleaved RoPE pairs, and Gemma's RMSNorm weights get their +1 back.

Writing streams: the header, metadata and every tensor's name, shape and type are computed from
the geometry (a meta skeleton will do) and written first; then each tensor is read, transformed,
encoded and written, one at a time (`ExportSource`: from memory, or from safetensors shards one
decoder layer at a time). The file equals, byte for byte, what the gguf package's whole-file path
writes from the same tensors.

The tokenizer: seap.export.gguf_vocab.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_path, write_error
from ..errors import ConfigError, ModelError
from ..model.loading import LoadedModel
from .gguf_vocab import write_tokenizer
from .source import ExportSource, as_source

log = logging.getLogger(__name__)

OUT_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
NATIVE_TYPES = ("f32", "f16", "q8_0")  # written by the gguf package; the rest by llama.cpp's quantizer
LLAMA_TYPES = ("llama", "mistral")  # model types written as llama / deci


@dataclass(frozen=True)
class GGUFConfig:
    out_type: str = "f32"
    tokenizer_from: str | None = None  # a .gguf whose tokenizer.* metadata is copied

    def __post_init__(self) -> None:
        if self.out_type not in OUT_TYPES:
            raise ConfigError(f"unknown GGUF type {self.out_type!r}: choose one of {', '.join(OUT_TYPES)}")
        if self.tokenizer_from is not None and not Path(self.tokenizer_from).is_file():
            raise ConfigError(f"--tokenizer-from {self.tokenizer_from} is not a file: give a .gguf of the base model")


@dataclass
class GGUFExport:
    path: Path
    arch: str
    out_type: str
    ffn_widths: list[int]
    n_tensors: int
    file_bytes: int
    tokenizer_source: str
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count
    streamed: bool = False  # read from the shards layer by layer (else from the model in memory)
    max_resident_layers: int | None = None  # decoder layers held at once while streaming

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


# -- architecture description ---------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    arch: str  # llama.cpp architecture name
    ffn_widths: list[int]
    heads: list[int]
    kv_heads: list[int]
    head_dim: int
    permute_qk: bool  # llama.cpp's llama/deci rotate interleaved pairs, HF rotates halves
    norm_shift: float  # Gemma: HF keeps w, llama.cpp multiplies by (1 + w)


def layout(lm: ExportSource | LoadedModel) -> Layout:
    """Which llama.cpp architecture can hold this model, or a clear error."""
    model, adapter = lm.model, lm.adapter
    cfg = model.config
    layers = adapter.layers(model)
    widths = [adapter.d_ff(layer) for layer in layers]
    geo = [adapter.head_geometry(layer) for layer in layers]
    heads, kv = [g.num_heads for g in geo], [g.num_kv_heads for g in geo]
    uniform = len(set(widths)) == 1 and len(set(heads)) == 1 and len(set(kv)) == 1
    mt = cfg.model_type
    if mt in LLAMA_TYPES:
        rope = _rope(cfg)
        if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
            raise ModelError(f"GGUF export does not write RoPE scaling {rope.get('rope_type')!r} yet: use llama.cpp's "
                             "convert_hf_to_gguf.py on the pruned folder")
        return Layout("llama" if uniform else "deci", widths, heads, kv, geo[0].head_dim, True, 0.0)
    if mt in ("gemma3_text", "gemma3"):
        if not uniform:
            raise ModelError("llama.cpp's gemma3 architecture needs the same FFN width and heads in every layer: "
                             "prune with --allocation uniform (seap prune --method wanda-sp or --allocation uniform)")
        if any(k.endswith(".bias") for k in model.state_dict()):
            raise ModelError("llama.cpp's gemma3 has no bias tensors, and bias compensation (or a refitted bias) "
                             "added some: prune without --bias-compensation (and with --no-refit-bias) to export "
                             "Gemma 3 to GGUF")
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        if scalar is not None and scalar != geo[0].head_dim:
            raise ModelError(f"llama.cpp's gemma3 scales attention by 1/sqrt(head_dim={geo[0].head_dim}) but this "
                             f"model uses query_pre_attn_scalar={scalar}: it cannot be exported to GGUF faithfully")
        return Layout("gemma3", widths, heads, kv, geo[0].head_dim, False, 1.0)
    raise ModelError(f"GGUF export supports Llama/Mistral (llama or deci) and Gemma 3 (gemma3), not {mt!r}: "
                     "export a supported family, or use the Hugging Face folder")


def _rope(cfg) -> dict:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in rp:  # Gemma 3: per attention type
        return rp["full_attention"]
    return rp or {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}


def _write_hparams(w, lm: ExportSource, lay: Layout) -> None:
    import gguf

    cfg = lm.model.config
    one = lambda xs: xs[0] if len(set(xs)) == 1 else list(xs)  # noqa: E731  (scalar when uniform)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(len(lay.ffn_widths))
    w.add_feed_forward_length(one(lay.ffn_widths))
    w.add_head_count(one(lay.heads))
    w.add_head_count_kv(one(lay.kv_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(lay.head_dim)
    w.add_value_length(lay.head_dim)
    w.add_vocab_size(int(cfg.vocab_size))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if lay.arch in ("llama", "deci"):
        w.add_rope_dimension_count(lay.head_dim)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
    else:  # gemma3
        swa = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention")
        if swa:
            w.add_rope_freq_base_swa(float(swa.get("rope_theta", 10000.0)))
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
            types = getattr(cfg, "layer_types", None)
            if types:
                w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _llama3_rope_factors(cfg, head_dim: int) -> torch.Tensor:
    """llama.cpp's rope_freqs tensor for Llama 3.x frequency scaling (a divisor per frequency)."""
    import math

    rope = _rope(cfg)
    base = float(rope.get("rope_theta", 500000.0))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, lo, hi = float(rope.get("factor", 8.0)), float(rope.get("low_freq_factor", 1.0)), \
        float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# -- tensors -------------------------------------------------------------------------------------
def _unpermute_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half layout -> llama.cpp interleaved pairs, per head (rows of q/k, or a bias)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFTensor:
    key: str | None  # the Hugging Face name (None: made here, e.g. rope_freqs)
    name: str  # llama.cpp's name
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType as stored

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = 1
        for s in self.shape:
            n *= s
        return n // block * size


def tensor_plan(src: ExportSource, lay: Layout, out_type: str) -> list[GGUFTensor]:
    """Every tensor of the file (name, shape, stored type) in writing order, from the geometry
    alone: the header is written before any value is read."""
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "deci": gguf.MODEL_ARCH.DECI, "gemma3": gguf.MODEL_ARCH.GEMMA3}[lay.arch]
    names = gguf.get_tensor_name_map(arch, len(lay.ffn_widths))
    out = []
    for spec in src.specs:
        if _skipped(src, spec.name):
            continue
        name = names.get_name(spec.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"no llama.cpp name for tensor {spec.name!r} (architecture {lay.arch}): this layout "
                             "cannot be exported to GGUF")
        out.append(GGUFTensor(spec.name, name, spec.shape, _qtype(spec.shape, out_type)))
    if _llama3_rope(src, lay):
        out.append(GGUFTensor(None, "rope_freqs.weight", (lay.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    return out


def _skipped(src: ExportSource, key: str) -> bool:
    # A tied LM head: llama.cpp reuses token_embd as the output matrix.
    return key == "lm_head.weight" and bool(getattr(src.model.config, "tie_word_embeddings", False))


def _llama3_rope(src: ExportSource, lay: Layout) -> bool:
    return lay.arch in ("llama", "deci") and _rope(src.model.config).get("rope_type") == "llama3"


def to_llamacpp(key: str, t: torch.Tensor, lay: Layout) -> np.ndarray:
    """One weight in llama.cpp's layout, float32."""
    t = t.detach().float().cpu()
    if lay.permute_qk and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
        layer = int(key.split(".layers.")[1].split(".")[0])
        n = lay.heads[layer] if ".q_proj." in key else lay.kv_heads[layer]
        t = _unpermute_heads(t, n)
    if lay.norm_shift and key.endswith("norm.weight"):
        t = t + lay.norm_shift
    return t.numpy()


def gguf_tensors(src: ExportSource, lay: Layout, plan: list[GGUFTensor]):
    """(entry, float32 array in llama.cpp's layout) in the order of `plan`, one tensor at a time."""
    entries = iter(plan)
    with closing(src.tensors()) as values:  # closed at once when writing stops early
        for key, t in values:
            if _skipped(src, key):
                continue
            e = next(entries)
            if e.key != key:  # the header already promised this order
                raise RuntimeError(f"tensor {key} came where {e.key} was expected")
            yield e, to_llamacpp(key, t, lay)
    for e in entries:
        if e.key is not None:
            raise RuntimeError(f"tensor {e.key} never came")
        yield e, _llama3_rope_factors(src.model.config, lay.head_dim).numpy()


def _qtype(shape: tuple[int, ...], out_type: str):
    """The stored type: 1-D tensors stay F32 (llama.cpp's convention); Q8_0 needs rows of whole blocks."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or out_type == "f32":
        return q.F32
    if out_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType
    if qtype == q.Q8_0:
        return gguf.quants.quantize(data.astype(np.float32), q.Q8_0)
    return data.astype(np.float16 if qtype == q.F16 else np.float32)


# -- export --------------------------------------------------------------------------------------
def write_gguf(src: ExportSource, path: Path, out_type: str, tokenizer_from: str | None = None,
               progress: bool = True) -> tuple[Layout, str, dict[str, int]]:
    """Write `src` to `path` (a native type: f32, f16 or q8_0), streaming: header, metadata and
    tensor infos from the geometry first, then the tensors one at a time as they are read."""
    import gguf

    lay = layout(src)
    plan = tensor_plan(src, lay, out_type)
    w = gguf.GGUFWriter(str(path), lay.arch)
    record = getattr(src.model.config, "seap_pruning", None) or {}
    base = record.get("base_model") or src.source.model_id
    w.add_name(f"{Path(str(base)).name}" + (f" seap-{record.get('method')}" if record else ""))
    if record:
        w.add_description(f"pruned by seap: {record.get('method')}, expert {record.get('expert')}, "
                          f"{100 * (record.get('achieved_ratio') or 0):.1f}% of FFN parameters removed")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(w, src, lay)
    n_vocab = int(src.adapter.embeddings(src.model).num_embeddings)
    tok_source = write_tokenizer(w, src, n_vocab, tokenizer_from)
    counts: dict[str, int] = {}
    for e in plan:
        w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
        counts[e.qtype.name] = counts.get(e.qtype.name, 0) + 1
    fallback = counts.get("F16", 0) if out_type == "q8_0" else 0
    if fallback:
        log.warning("%d tensors have rows that are not a multiple of 32 and stay F16 in the Q8_0 file: prune with "
                    "--multiple 32 for a fully quantised file", fallback)
    tensors = gguf_tensors(src, lay, plan)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e, data in tqdm(tensors, total=len(plan), desc=f"gguf {out_type}", disable=not progress):
            w.write_tensor_data(_encode(data, e.qtype))
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        tensors.close()  # a streamed source frees its loaded layer
        w.close()
    return lay, tok_source, counts


def export_gguf(model: str | LoadedModel | ExportSource, out: str | Path, config: GGUFConfig | None = None, *,
                progress: bool = True, runtime=None) -> GGUFExport:
    """Write a (pruned) model as one GGUF file, atomically. A safetensors folder streams from its
    shards, one decoder layer in memory at a time. Q4_K_M goes through llama.cpp's quantizer."""
    cfg = config or GGUFConfig()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"the GGUF output must end in .gguf, got {out}")
    src = as_source(model, runtime)
    t0 = time.time()
    with atomic_path(out) as tmp:
        if cfg.out_type in NATIVE_TYPES:
            lay, tok, counts = write_gguf(src, tmp, cfg.out_type, cfg.tokenizer_from, progress)
        else:
            from .llamacpp import quantize

            with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as work:
                f32 = Path(work) / "f32.gguf"
                lay, tok, _ = write_gguf(src, f32, "f32", cfg.tokenizer_from, progress)
                counts = quantize(f32, tmp, cfg.out_type)
    return GGUFExport(out, lay.arch, cfg.out_type, lay.ffn_widths, sum(counts.values()), out.stat().st_size, tok,
                      round(time.time() - t0, 1), counts, src.streamed, src.max_resident_layers)

"""vLLM export (docs/design.md §3): a folder vLLM serves, for uniform or per-layer FFN widths.

Uniform widths are a plain Hugging Face folder of the model's own architecture (vLLM loads
Llama, Gemma 3 and OPT as they are). Per-layer widths of a Llama-family model use the DeciLM /
Nemotron-NAS block-config layout that vLLM's `DeciLMForCausalLM` reads: `block_configs[i]` gives
layer i's `ffn.intermediate_size` and `attention.n_heads_in_group`; the weights keep their Llama
names. The folder carries its own `configuration_decilm.py` (serve with `trust_remote_code`).

Tensors are written to sharded safetensors one at a time (seap.model.checkpoint's writer), so a pruned
folder or a base checkpoint with a plan is exported one decoder layer in memory at a time.

Tensor parallelism shards every FFN width and head count over the GPUs, so `tensor_parallel=N`
checks that each layer's width and heads divide by N (prune with `--multiple N` to get there).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .._io import atomic_dir, write_error
from ..errors import ConfigError, ModelError
from ..model.checkpoint import DEFAULT_SHARD_BYTES, write_tensors
from ..model.loading import LoadedModel
from ..model.pruned_folder import needs_seap_loader, write_config
from ..model.tokenizer import save_tokenizer
from ..pruning.surgery import SEAP_CONFIG_KEY
from .source import ExportSource, as_source

DECILM_TYPES = ("llama", "mistral")
CONFIG_MODULE = Path(__file__).with_name("configuration_decilm.py")


@dataclass
class VLLMExport:
    path: Path
    layout: str  # "decilm" or the plain model type
    ffn_widths: list[int]
    kv_heads: list[int]
    tensor_parallel: int
    seconds: float
    streamed: bool = False  # read from the shards layer by layer (else from the model in memory)
    max_resident_layers: int | None = None  # decoder layers held at once while streaming

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def _geometry(lm: ExportSource) -> tuple[list[int], list[int], list[int]]:
    layers = lm.adapter.layers(lm.model)
    geo = [lm.adapter.head_geometry(layer) for layer in layers]
    return [lm.adapter.d_ff(layer) for layer in layers], [g.num_heads for g in geo], [g.num_kv_heads for g in geo]


def check_tensor_parallel(widths: list[int], heads: list[int], kv_heads: list[int], tp: int) -> None:
    """vLLM shards FFN columns and query heads over `tp` GPUs; KV heads are sharded or replicated."""
    if tp < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {tp}")
    bad = [i for i, w in enumerate(widths) if w % tp]
    if bad:
        raise ConfigError(f"FFN widths of layers {bad[:5]} ({[widths[i] for i in bad[:5]]}) do not divide by the "
                          f"tensor-parallel size {tp}: prune again with --multiple {tp} (or a multiple of it)")
    if any(h % tp for h in heads) or any(k % tp and tp % k for k in kv_heads):
        raise ConfigError(f"attention heads ({sorted(set(heads))} query, {sorted(set(kv_heads))} KV) cannot be "
                          f"split over {tp} GPUs: choose a tensor-parallel size that divides them")


def decilm_config(lm: ExportSource, widths: list[int], heads: list[int], kv_heads: list[int]) -> dict:
    """config.json of the DeciLM layout for a Llama-family model with per-layer widths."""
    cfg = lm.model.config
    if cfg.model_type not in DECILM_TYPES:
        raise ModelError(f"vLLM's block-config layout (DeciLM) holds Llama-family models; {cfg.model_type!r} with "
                         "per-layer widths has no vLLM layout: prune with --allocation uniform to get a plain folder")
    n_heads = int(cfg.num_attention_heads)
    if any(h != n_heads for h in heads):
        raise ModelError("vLLM's DeciLM layout keeps every layer's query heads; this model has pruned heads: "
                         "export a plan made with --heads none, or use the Hugging Face folder")
    if any(n_heads % k for k in kv_heads):
        raise ModelError(f"KV heads per layer {kv_heads} do not divide the {n_heads} query heads")
    data = cfg.to_dict()
    for key in ("per_layer_config", "quantization_config", "_name_or_path", "auto_map", "architectures", "seap_layout"):
        data.pop(key, None)
    data.update(
        architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        intermediate_size=max(widths), num_key_value_heads=max(kv_heads),
        block_configs=[{"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": n_heads // k},
                        "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": w}}
                       for w, k in zip(widths, kv_heads)])
    return data


def export_vllm(model: str | LoadedModel | ExportSource, out: str | Path, *, tensor_parallel: int = 1,
                runtime=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> VLLMExport:
    """Write a folder that vLLM loads: plain when widths are uniform, DeciLM block configs otherwise.
    Tensors go to sharded safetensors one at a time (a safetensors folder streams from its shards)."""
    t0 = time.time()
    src = as_source(model, runtime)
    widths, heads, kv = _geometry(src)
    check_tensor_parallel(widths, heads, kv, tensor_parallel)
    config = src.model.config
    record = getattr(config, SEAP_CONFIG_KEY, None)
    uniform = len(set(widths)) == 1 and len(set(heads)) == 1 and len(set(kv)) == 1
    if record and record.get("ffn_out_bias") and not record.get("ffn_out_bias_native"):
        raise ModelError(f"{config.model_type} cannot hold the FFN bias that bias compensation (or a refitted "
                         "bias) added, in vLLM or transformers: prune without --bias-compensation (and with "
                         "--no-refit-bias) for serving")
    plain = uniform and not (record and needs_seap_loader(record))
    data = None if plain else decilm_config(src, widths, heads, kv)
    if data is not None:  # the dtype the tensors are written in, not the one the model was computed in
        data.pop("torch_dtype", None)
        data["dtype"] = str(src.dtype).replace("torch.", "")
    specs, raw = src.specs, src.tensors()
    values = raw
    if data is not None and data.get("tie_word_embeddings"):  # vLLM ties lm_head back to embed_tokens
        specs = [s for s in specs if s.name != "lm_head.weight"]
        values = ((n, t) for n, t in raw if n != "lm_head.weight")
    values = tqdm(values, total=len(specs), desc="vllm", unit="tensor", disable=not progress)
    out = Path(out)
    try:
        with atomic_dir(out) as tmp:
            write_tensors(tmp, values, specs, max_shard_bytes, target=out)
            if plain:
                write_config(src.model, tmp, src.dtype)
                kind = config.model_type
            else:
                (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
                shutil.copyfile(CONFIG_MODULE, tmp / "configuration_decilm.py")
                kind = "decilm"
            if src.tokenizer is not None:
                save_tokenizer(src.tokenizer, tmp)
    except OSError as err:
        raise write_error(out, err) from None
    finally:
        values.close()
        raw.close()  # a streamed source frees its loaded layer even when writing stopped early
    return VLLMExport(out, kind, widths, kv, tensor_parallel, round(time.time() - t0, 1), src.streamed,
                      src.max_resident_layers)

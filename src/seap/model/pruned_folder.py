"""Pruned models as Hugging Face folders (config.json + sharded safetensors + tokenizer), no pickle.

One writer serves both paths: a sliced model in memory, and the layer-by-layer path that streams
sliced tensors from the source checkpoint; tensors go to disk one at a time, in the saved dtype.

Uniform widths and native biases reload with plain `from_pretrained`. Per-layer widths, pruned
heads or a bias the stock class cannot hold are written as `per_layer_config` (the transformers
5.x heterogeneous-config field) so that a plain load fails loudly instead of misloading, and
`load_pruned` builds each layer at its recorded size.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_dir, write_error
from ..errors import ArtifactError, ModelError
from .adapters import adapter_for_config
from .checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, TensorSpec, write_tensors
from .tokenizer import save_tokenizer

log = logging.getLogger(__name__)

SEAP_CONFIG_KEY = "seap_pruning"  # where a pruned model's config records what was pruned


def needs_seap_loader(record: dict) -> bool:
    return (len(set(record["ffn_widths"])) > 1 or record.get("num_heads") is not None
            or (record.get("ffn_out_bias") and not record.get("ffn_out_bias_native")))


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a saved folder holds: parameters (a tied one once) and persistent buffers."""
    out = [(n, p) for n, p in model.named_parameters()]
    for mod_name, mod in model.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def tensor_specs(model: nn.Module, dtype: torch.dtype) -> list[TensorSpec]:
    """Names, shapes and saved dtypes (floating tensors in `dtype`) of `model_tensors(model)`."""
    return [TensorSpec(n, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)) for n, t in model_tensors(model)]


def save_pruned(model: nn.Module, tokenizer, folder: str | Path, *, dtype: torch.dtype | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a (sliced) model in memory and its tokenizer atomically, as sharded safetensors in `dtype`
    (default: the model's own); returns the folder."""
    if getattr(model.config, SEAP_CONFIG_KEY, None) is None:
        raise ArtifactError("this model has not been pruned by seap (no seap_pruning record): slice it first")
    dtype = dtype or next(model.parameters()).dtype
    specs = tensor_specs(model, dtype)
    values = ((n, t.detach().to(s.dtype)) for (n, t), s in zip(model_tensors(model), specs))
    return write_pruned_folder(folder, model, specs, values, tokenizer, dtype, max_shard_bytes)


def write_pruned_folder(folder: str | Path, layout: nn.Module, specs: list[TensorSpec], values, tokenizer,
                        dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """The one writer of pruned folders: `layout` gives the config (a meta skeleton will do), `values`
    yields (name, tensor) in the order of `specs`, streamed to shards. Atomic: an interrupted or
    failed write leaves no folder behind."""
    folder = Path(folder)
    record = getattr(layout.config, SEAP_CONFIG_KEY, None)
    if record is None:
        raise ArtifactError("this model has not been pruned by seap (no seap_pruning record): slice it first")
    try:
        with atomic_dir(folder) as tmp:
            write_tensors(tmp, values, specs, max_shard_bytes, target=folder)
            _write_config(layout, record, tmp, dtype)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
    except OSError as err:
        raise write_error(folder, err) from None
    return folder


def write_config(model: nn.Module, folder: Path, dtype: torch.dtype) -> dict:
    """config.json (+ generation_config.json) as save_pretrained writes them, in `dtype`, without the
    GGUF quantisation record a dequantised model carries; returns the config written."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def _write_config(layout: nn.Module, record: dict, folder: Path, dtype: torch.dtype) -> None:
    cfg = write_config(layout, folder, dtype)
    adapter = adapter_for_config(layout.config)
    cfg_path = folder / "config.json"
    if needs_seap_loader(record):
        width_key = adapter.ffn_width_key
        cfg[width_key] = record["dense_ffn_width"]  # per-layer values differ from it: plain loads refuse
        per_layer = {}
        for i, w in enumerate(record["ffn_widths"]):
            entry = {width_key: w}
            if record.get("num_heads") is not None:
                entry["seap_num_heads"] = record["num_heads"][i]
                entry["seap_num_kv_heads"] = record["num_kv_heads"][i]
            per_layer[str(i).zfill(len(str(len(record["ffn_widths"]) - 1)))] = entry
        cfg["per_layer_config"] = per_layer
        _add_remote_code(cfg, adapter, folder)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _add_remote_code(cfg: dict, adapter, folder: Path) -> None:
    """Per-layer widths need their own modeling code to load without seap: the folder carries
    seap/model/modeling_seap.py and config.json points `trust_remote_code` loaders at it."""
    from . import modeling_seap

    arch = (cfg.get("architectures") or [""])[0]
    if arch not in modeling_seap.ARCHITECTURES:
        log.warning("no trust_remote_code class for %s: the folder loads with seap's loader only", arch)
        return
    cfg["auto_map"] = {"AutoModelForCausalLM": f"modeling_seap.Seap{arch}"}
    cfg["seap_layout"] = {"layers": list(adapter.layers_paths), "ffn_in": list(adapter.ffn_in_names),
                          "ffn_out": adapter.ffn_out_name, "q": adapter.q_name, "k": adapter.k_name,
                          "v": adapter.v_name, "o": adapter.o_name}
    shutil.copyfile(modeling_seap.__file__, folder / "modeling_seap.py")


def is_pruned_folder(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    try:
        return SEAP_CONFIG_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_record(folder: str | Path) -> dict:
    cfg = Path(folder) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{cfg} is missing or corrupt ({err}): prune again") from None
    if SEAP_CONFIG_KEY not in data:
        raise ArtifactError(f"{folder} is not a seap-pruned folder (no {SEAP_CONFIG_KEY} in config.json)")
    return data


def load_pruned(folder: str | Path, dtype: torch.dtype | None = None, *, device: torch.device | str | None = None,
                device_map: str | dict | None = None) -> nn.Module:
    """Rebuild a seap-pruned folder at its recorded sizes and load its weights (default float32 on the CPU).

    `device_map` (e.g. 'auto'): accelerate places the layers over the GPUs and the CPU, as
    `from_pretrained(device_map=...)` does for plain folders. Weights are read one shard at a time."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    record = read_record(folder)[SEAP_CONFIG_KEY]
    torch_dtype = dtype or torch.float32
    if not needs_seap_loader(record):
        kwargs = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
        if device_map is None and device is not None:
            model.to(device)
        return model.eval()
    model = pruned_skeleton(folder, torch_dtype)
    config = model.config
    try:
        ckpt = Checkpoint.open(folder)
    except ModelError as err:
        raise ArtifactError(str(err)) from None  # its fix already says to prune again
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {n: t for n, t in model_tensors(model) if not (tied and n.endswith("lm_head.weight"))}
    missing = [n for n in expected if n not in ckpt]
    unexpected = [n for n in ckpt.names() if n not in expected]
    wrong = [n for n in expected if n in ckpt and tuple(expected[n].shape) != ckpt.tensors[n].shape]
    if missing or unexpected or wrong:
        raise ArtifactError(f"weights in {folder} do not match its recorded shapes (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}, other shapes {wrong[:3]}): prune again")
    if device_map is not None:
        from accelerate import infer_auto_device_map

        placement = device_map if isinstance(device_map, dict) else infer_auto_device_map(
            model, no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []), dtype=torch_dtype)
    else:
        placement = {"": str(device or "cpu")}
    _load_tensors(model, ckpt, placement, torch_dtype)
    if tied:
        model.tie_weights()
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, placement)
    return model.eval()


def pruned_skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """A pruned folder's model as an empty (meta) skeleton at its recorded widths and heads."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .skeleton import empty_model

    data = read_record(folder)
    record = data[SEAP_CONFIG_KEY]
    if not needs_seap_loader(record):
        return empty_model(AutoConfig.from_pretrained(folder), dtype)
    data = {k: v for k, v in data.items() if k != "per_layer_config"}
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    adapter = adapter_for_config(config)
    model = empty_model(config, dtype)
    for i, layer in enumerate(adapter.layers(model)):
        heads = record["num_heads"][i] if record.get("num_heads") else None
        kv = record["num_kv_heads"][i] if record.get("num_kv_heads") else None
        adapter.resize_layer(layer, record["ffn_widths"][i], heads, kv, bool(record.get("ffn_out_bias")),
                             bool(record.get("attn_out_bias")))
    if len(set(record["ffn_widths"])) == 1:
        setattr(model.config, adapter.ffn_width_key, record["ffn_widths"][0])
    return model


def _load_tensors(model: nn.Module, ckpt: Checkpoint, placement: dict, dtype: torch.dtype) -> None:
    """Each tensor from its shard to the device `placement` names for it (longest matching prefix)."""
    from accelerate.utils import set_module_tensor_to_device

    def where(name: str) -> str:
        best = max((k for k in placement if k == "" or name == k or name.startswith(k + ".")), key=len)
        dev = placement[best]
        return "cpu" if dev == "disk" else dev  # GPU indices stay ints, as accelerate takes them

    by_file: dict[str, list[str]] = {}
    for n, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append(n)
    for names in by_file.values():
        for n, t in ckpt.read(names).items():
            set_module_tensor_to_device(model, n, where(n), value=t.to(dtype) if t.is_floating_point() else t)
    for n, b in list(model.named_buffers()):  # non-persistent buffers (rotary tables) follow their module
        if b is not None and b.device.type != "meta":
            dev = where(n)
            if b.device != torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}"):
                set_module_tensor_to_device(model, n, dev, value=b)

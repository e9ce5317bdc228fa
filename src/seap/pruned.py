"""Pruned models as Hugging Face folders (config.json + model.safetensors + tokenizer), no pickle.

Uniform widths and native biases reload with plain `from_pretrained`. Per-layer widths, pruned
heads or a bias the stock class cannot hold are written as `per_layer_config` (the transformers
5.x heterogeneous-config field) so that a plain load fails loudly instead of misloading, and
`load_pruned` builds each layer at its recorded size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ._io import atomic_dir
from .adapters import adapter_for_config
from .errors import ArtifactError
from .surgery import SEAP_CONFIG_KEY

log = logging.getLogger(__name__)


def needs_seap_loader(record: dict) -> bool:
    return (len(set(record["ffn_widths"])) > 1 or record.get("num_heads") is not None
            or (record.get("ffn_out_bias") and not record.get("ffn_out_bias_native")))


def save_pruned(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write the (sliced) model and its tokenizer atomically; returns the folder."""
    folder = Path(folder)
    record = getattr(model.config, SEAP_CONFIG_KEY, None)
    if record is None:
        raise ArtifactError("this model has not been pruned by seap (no seap_pruning record): slice it first")
    adapter = adapter_for_config(model.config)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
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
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


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


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {}
            for f in files:
                sd.update(load_file(str(folder / f)))
            return sd
        return load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"weights in {folder} are missing or corrupt ({str(err)[:80]}): prune again") from None


def load_pruned(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a seap-pruned folder at its recorded sizes and load its weights."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(folder)
    data = read_record(folder)
    record = data[SEAP_CONFIG_KEY]
    if not needs_seap_loader(record):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        return model.eval()
    data = dict(data)
    data.pop("per_layer_config", None)
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    adapter = adapter_for_config(config)
    torch_dtype = dtype or getattr(torch, str(data.get("dtype") or "float32").replace("torch.", ""))
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    ffn_out_bias = bool(record.get("ffn_out_bias"))
    for i, layer in enumerate(adapter.layers(model)):
        heads = record["num_heads"][i] if record.get("num_heads") else None
        kv = record["num_kv_heads"][i] if record.get("num_kv_heads") else None
        adapter.resize_layer(layer, record["ffn_widths"][i], heads, kv, ffn_out_bias,
                             bool(record.get("attn_out_bias")))
    sd = _state_dict(folder)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied LM head is not stored; tie_weights() below restores it.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ArtifactError(f"weights in {folder} do not match its recorded shapes (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): prune again")
    if tied:
        model.tie_weights()
    if len(set(record["ffn_widths"])) == 1:
        setattr(model.config, adapter.ffn_width_key, record["ffn_widths"][0])
    return model.to(torch_dtype).eval()

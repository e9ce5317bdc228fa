"""Modeling code that a seap-pruned folder with per-layer widths carries, for `trust_remote_code`.

Copied into the folder (config.json's `auto_map` points here), like the modeling files of DeciLM or
Nemotron-NAS folders, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
and `lm_eval --model hf --model_args pretrained=folder,trust_remote_code=True` load the pruned model
without seap installed. Each class is the stock transformers class of its architecture, built at the
dense sizes and then given each layer's recorded FFN width and head counts (the `seap_pruning` record)
before the weights are read; the module names come from config.json's `seap_layout`, which seap writes
from its architecture adapter.

This file must import nothing but torch and transformers: it runs where seap is not installed.
"""

from __future__ import annotations

import transformers
from torch import nn

# The stock classes seap prunes (seap.model.adapters): one subclass each, named Seap<class>.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "SmolLM3ForCausalLM", "GraniteForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM",
                 "GemmaForCausalLM", "OPTForCausalLM")


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def _layers(model: nn.Module, paths: list[str]) -> nn.ModuleList:
    for path in paths:
        try:
            return _get(model, path)
        except AttributeError:
            continue
    raise AttributeError(f"no decoder layers at {paths}")


def resize(model: nn.Module, record: dict, layout: dict) -> None:
    """Give each decoder layer its recorded FFN width (and head counts): empty linears of those sizes."""
    for i, layer in enumerate(_layers(model, layout["layers"])):
        width = record["ffn_widths"][i]
        for name in layout["ffn_in"]:
            lin = _get(layer, name)
            _set(layer, name, _linear(lin, lin.in_features, width, lin.bias is not None))
        out = _get(layer, layout["ffn_out"])
        _set(layer, layout["ffn_out"], _linear(out, width, out.out_features,
                                               bool(record.get("ffn_out_bias")) or out.bias is not None))
        if record.get("num_heads") is None:
            continue
        heads, kv = record["num_heads"][i], record["num_kv_heads"][i]
        attn = _get(layer, layout["o"].rpartition(".")[0])
        hd = int(attn.head_dim)
        for key, n in (("q", heads), ("k", kv), ("v", kv)):
            lin = _get(layer, layout[key])
            _set(layer, layout[key], _linear(lin, lin.in_features, n * hd, lin.bias is not None))
        o = _get(layer, layout["o"])
        _set(layer, layout["o"], _linear(o, heads * hd, o.out_features,
                                         bool(record.get("attn_out_bias")) or o.bias is not None))
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)


def dense_config(config):
    """The config without its per-layer overrides: the stock class builds every layer at the dense
    sizes (the recorded widths are then applied by `resize`)."""
    values = {k: v for k, v in config.to_dict().items() if k != "per_layer_config"}
    return type(config).from_dict(values)


def _pruned_class(base: type) -> type:
    class Pruned(base):
        def __init__(self, config, *args, **kwargs):
            config = dense_config(config)
            super().__init__(config, *args, **kwargs)
            resize(self, config.seap_pruning, config.seap_layout)  # new linears on the old ones' device

    Pruned.__name__ = Pruned.__qualname__ = f"Seap{base.__name__}"
    Pruned.__doc__ = f"{base.__name__} with the per-layer FFN widths and head counts that seap recorded."
    return Pruned


for _name in ARCHITECTURES:
    if hasattr(transformers, _name):
        globals()[f"Seap{_name}"] = _pruned_class(getattr(transformers, _name))

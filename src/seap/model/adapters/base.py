"""The architecture adapter: where a family keeps its layers, FFN linears and heads.

Everything else in seap talks to models only through an adapter, so supporting a new family
means writing one small subclass, not copying the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import ConfigError


@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads


def _get(root: nn.Module, dotted: str) -> nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _first_of(model: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    """The module at the first of `paths` the model has (a causal LM, or its bare base model)."""
    for path in paths:
        try:
            return _get(model, path)
        except AttributeError:
            continue
    raise AttributeError(f"no {what} found at {paths}")


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


class Adapter:
    """Names and small operations of one architecture family."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_paths: ClassVar[tuple[str, ...]]  # tried in order (plain and multimodal wrappers)
    embed_paths: ClassVar[tuple[str, ...]]
    ffn_in_names: ClassVar[tuple[str, ...]]  # linears whose rows are FFN channels
    ffn_out_name: ClassVar[str]  # linear whose columns are FFN channels (its input is z)
    q_name: ClassVar[str]
    k_name: ClassVar[str]
    v_name: ClassVar[str]
    o_name: ClassVar[str]
    ffn_width_key: ClassVar[str] = "intermediate_size"
    activation: ClassVar[str]  # "swiglu" | "geglu" | "relu": for docs and GRIFFIN

    # -- structure -------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _first_of(model, self.layers_paths, "decoder layers")

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return _first_of(model, self.embed_paths, "input embeddings")

    def ffn_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [_get(layer, n) for n in self.ffn_in_names]

    def ffn_out(self, layer: nn.Module) -> nn.Linear:
        return _get(layer, self.ffn_out_name)

    def d_ff(self, layer: nn.Module) -> int:
        return self.ffn_out(layer).in_features

    def hidden_size(self, model: nn.Module) -> int:
        return self.ffn_out(self.layers(model)[0]).out_features

    def attn_in(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return _get(layer, self.q_name), _get(layer, self.k_name), _get(layer, self.v_name)

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return _get(layer, self.o_name)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.o_name.rpartition(".")[0])

    def head_geometry(self, layer: nn.Module) -> HeadGeometry:
        q, k, _ = self.attn_in(layer)
        head_dim = self._head_dim(layer)
        return HeadGeometry(q.out_features // head_dim, k.out_features // head_dim, head_dim)

    def _head_dim(self, layer: nn.Module) -> int:
        return int(self.attention(layer).head_dim)

    def set_head_counts(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Record new head counts on the attention module after its linears were sliced."""
        attn = self.attention(layer)
        for name, value in (("num_heads", num_heads), ("num_attention_heads", num_heads),
                            ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    # -- per-parameter costs -------------------------------------------------------------
    def ffn_channel_cost(self, layer: nn.Module) -> int:
        """Parameters removed with one FFN channel (rows of the input linears, a column of the output)."""
        cost = sum(lin.in_features + (lin.bias is not None) for lin in self.ffn_in(layer))
        return cost + self.ffn_out(layer).out_features

    def head_unit_cost(self, layer: nn.Module, kv_groups: bool) -> int:
        """Parameters removed with one head (MHA) or one whole KV group (GQA)."""
        q, k, v = self.attn_in(layer)
        g = self.head_geometry(layer)
        hidden = q.in_features
        per_q_head = g.head_dim * (hidden + (q.bias is not None)) + g.head_dim * self.attn_out(layer).out_features
        per_kv_head = g.head_dim * (2 * hidden + (k.bias is not None) + (v.bias is not None))
        if kv_groups:
            return g.group_size * per_q_head + per_kv_head
        return per_q_head + per_kv_head  # MHA: one query head owns one key and value head

    # -- config and reload ---------------------------------------------------------------
    def supports_native_ffn_out_bias(self, config) -> bool:
        """Whether the stock transformers class can hold a bias on the FFN output linear."""
        return False

    def enable_ffn_out_bias(self, config) -> None:  # pragma: no cover - overridden where possible
        raise NotImplementedError

    def resize_layer(self, layer: nn.Module, ffn_width: int, num_heads: int | None,
                     num_kv_heads: int | None, ffn_out_bias: bool, attn_out_bias: bool) -> None:
        """Replace the linears of a freshly built layer by empty ones of the recorded sizes."""
        for name in self.ffn_in_names:
            lin = _get(layer, name)
            _set(layer, name, _like(lin, lin.in_features, ffn_width, lin.bias is not None))
        out = self.ffn_out(layer)
        _set(layer, self.ffn_out_name, _like(out, ffn_width, out.out_features, ffn_out_bias or out.bias is not None))
        if num_heads is None:
            return
        hd = self._head_dim(layer)
        for name, n in ((self.q_name, num_heads), (self.k_name, num_kv_heads), (self.v_name, num_kv_heads)):
            lin = _get(layer, name)
            _set(layer, name, _like(lin, lin.in_features, n * hd, lin.bias is not None))
        o = self.attn_out(layer)
        _set(layer, self.o_name, _like(o, num_heads * hd, o.out_features, attn_out_bias or o.bias is not None))
        self.set_head_counts(layer, num_heads, num_kv_heads)


def _like(lin: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=lin.weight.device, dtype=lin.weight.dtype)


def set_module(root: nn.Module, dotted: str, value: nn.Module) -> None:
    _set(root, dotted, value)


def module_path(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise KeyError("module not found in model")


def by_sequence(x: torch.Tensor, batch: int | None) -> torch.Tensor:
    """An FFN hook's input as [batch, tokens, features]; OPT flattens (batch, seq) before its FFN.
    `batch` None: a 3-d input stays as it is and a flat one is one sequence."""
    if batch is None:
        return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
    if (x.dim() == 3 and x.shape[0] != batch) or x.shape[:-1].numel() % batch:
        raise ConfigError(f"an FFN input of shape {tuple(x.shape)} does not split into the batch's {batch} "
                          "sequences: one expert per sequence (beam search and several returned sequences "
                          "are not supported)")
    return x.reshape(batch, -1, x.shape[-1])


def zero_bias(lin: nn.Linear) -> None:
    """Give a linear a zero bias (so bias compensation has somewhere to go)."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))

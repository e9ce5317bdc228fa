"""Applying a plan to a model (docs/design.md §3): physically sliced linears, or a masked twin for checks.

Slicing keeps rows of the FFN input linears and columns of the output linear (and whole heads
of q/k/v/o); bias compensation is added to the output linears' biases, and with reconstruction
(seap.core.reconstruct) the output linears' kept columns take their refitted values.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from torch import nn

from ..model.adapters import Adapter
from ..model.adapters.base import zero_bias
from ..model.fingerprints import check_fingerprint
from ..model.hooks import Hook, hooked
from ..model.pruned_folder import SEAP_CONFIG_KEY
from .plan import Expert, Plan

if TYPE_CHECKING:
    from ..model.loading import LoadedModel



def _head_channels(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).flatten()


def head_index_sets(adapter: Adapter, layer: nn.Module, units: torch.Tensor, head_unit: str):
    """Channel indices to keep in q (and o's input) and in k/v for the kept heads or KV groups."""
    g = adapter.head_geometry(layer)
    if head_unit == "kv_groups":
        q_heads = (units[:, None] * g.group_size + torch.arange(g.group_size)).flatten()
        kv_heads = units
    else:  # multi-head attention: query head h owns key/value head h
        q_heads = kv_heads = units
    return _head_channels(q_heads, g.head_dim), _head_channels(kv_heads, g.head_dim), len(q_heads), len(kv_heads)


def _slice_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(0, idx).clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).clone(), requires_grad=False)
    lin.out_features = len(idx)


def _slice_cols(lin: nn.Linear, idx: torch.Tensor, refit: torch.Tensor | None = None) -> None:
    """Keep columns `idx`; with reconstruction their values are the refitted weights (not on a meta layout)."""
    w = lin.weight.data
    if refit is not None and w.device.type != "meta":
        new = refit.to(w.device, w.dtype).clone()
    else:
        new = w.index_select(1, idx.to(w.device)).clone()
    lin.weight = nn.Parameter(new, requires_grad=False)
    lin.in_features = len(idx)


def _add_bias(lin: nn.Linear, delta: torch.Tensor) -> None:
    # In float32 whatever the model's dtype, so a bf16 layer and a float32 copy of it end equal once saved.
    b = lin.bias.data
    lin.bias.data = (b.float() + delta.to(b.device, torch.float32)).to(b.dtype)


def slice_layer(layer: nn.Module, adapter: Adapter, ex: Expert, i: int,
                head_unit: str | None) -> tuple[int, int] | None:
    """Cut decoder layer i to expert `ex` in place; returns its new (query, KV) head counts when heads go."""
    idx = ex.ffn[i]
    if ex.ffn_bias is not None:
        adapter.prepare_ffn_out_bias(layer)
    if len(idx) < adapter.d_ff(layer):
        for lin in adapter.ffn_in(layer):
            _slice_rows(lin, idx)
    if len(idx) < adapter.d_ff(layer) or ex.ffn_out is not None:
        _slice_cols(adapter.ffn_out(layer), idx, None if ex.ffn_out is None else ex.ffn_out[i])
    if ex.ffn_bias is not None:
        _add_bias(adapter.ffn_out(layer), ex.ffn_bias[i])
    if ex.heads is None:
        return None
    q_idx, kv_idx, n_q, n_kv = head_index_sets(adapter, layer, ex.heads[i], head_unit)
    q, k, v = adapter.attn_in(layer)
    o = adapter.attn_out(layer)
    if ex.attn_bias is not None:
        for lin in (q, k, v, o):
            zero_bias(lin)
    _slice_rows(q, q_idx)
    _slice_rows(k, kv_idx)
    _slice_rows(v, kv_idx)
    _slice_cols(o, q_idx, None if ex.attn_out is None else ex.attn_out[i])
    if ex.attn_bias is not None:
        _add_bias(o, ex.attn_bias[i])
    adapter.set_head_counts(layer, n_q, n_kv)
    return n_q, n_kv


def plan_and_expert(spec: str | Path | Plan) -> tuple[Plan, str | None]:
    """A plan given as a Plan, a plan folder (or a `seap prune` output), or 'FOLDER:EXPERT'."""
    if isinstance(spec, Plan):
        return spec, None
    text = str(spec)
    folder, sep, expert = text.rpartition(":")
    if not sep or Path(text).exists() or not folder:
        return Plan.load(text), None
    return Plan.load(folder), expert or None


def sliced(lm: LoadedModel, plan: str | Path | Plan, expert: str | None = None) -> LoadedModel:
    """A physically pruned copy of `lm` for one expert of `plan` (None: the expert a 'FOLDER:EXPERT' spec
    names, else the plan's default), refused when the plan was made for another model; `lm` stays as it is."""
    plan, named = plan_and_expert(plan)
    check_fingerprint(plan.meta.fingerprint, lm.model, lm.adapter)
    name, _ = plan.expert(expert or named)
    model = copy.deepcopy(lm.model)
    slice_model(model, lm.adapter, plan, name, check=False)
    return dataclasses.replace(lm, model=model)


@torch.no_grad()
def slice_model(model: nn.Module, adapter: Adapter, plan: Plan, expert: str | None = None,
                check: bool = True) -> nn.Module:
    """Physically prune `model` in place to the plan's expert and record the result in its config.

    Works on an empty (meta) skeleton too: that gives the pruned layout without any weights."""
    if check:
        check_fingerprint(plan.meta.fingerprint, model, adapter)
    name, ex = plan.expert(expert)
    layers = adapter.layers(model)
    ffn_out_native = adapter.supports_native_ffn_out_bias(model.config)
    if ex.ffn_bias is not None and ffn_out_native:
        adapter.enable_ffn_out_bias(model.config)
    attn_bias = ex.attn_bias is not None
    if attn_bias and hasattr(model.config, "attention_bias"):
        model.config.attention_bias = True
    heads, kv_heads = [], []
    for i, layer in enumerate(layers):
        counts = slice_layer(layer, adapter, ex, i, plan.head_unit)
        if counts is not None:
            heads.append(counts[0])
            kv_heads.append(counts[1])
    widths = [adapter.d_ff(layer) for layer in layers]
    record = {
        "ffn_widths": widths,
        "dense_ffn_width": int(plan.meta.fingerprint["arch"]["d_ff"][0]),
        "num_heads": heads or None,
        "num_kv_heads": kv_heads or None,
        "ffn_out_bias": ex.ffn_bias is not None,
        "ffn_out_bias_native": bool(ex.ffn_bias is not None and ffn_out_native),
        "attn_out_bias": attn_bias,
        "base_model": plan.meta.base_model,
        "method": plan.meta.method,
        "expert": name,
        "target_ratio": plan.meta.target_ratio,
        "achieved_ratio": ex.stats.get("achieved_ratio"),
        "seap_version": plan.meta.seap_version,
    }
    setattr(model.config, SEAP_CONFIG_KEY, record)
    if len(set(widths)) == 1:
        setattr(model.config, adapter.ffn_width_key, widths[0])
    return model


def _mask_hooks(layer: nn.Module, adapter: Adapter, ex: Expert, i: int, head_unit: str | None) -> list[Hook]:
    """Hooks that make decoder layer i of a dense model compute what expert `ex` computes."""
    hooks: list[Hook] = []

    def zero_inputs(keep: torch.Tensor, n: int):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True

        def hook(_m, args):
            x = args[0]
            return (x * mask.to(x.device, x.dtype),) + tuple(args[1:])
        return hook

    def refitted(keep: torch.Tensor, weight: torch.Tensor):
        def hook(m, args, _out):  # the kept inputs through the refitted weights, the layer's own bias
            x = args[0]
            return nn.functional.linear(x.index_select(-1, keep.to(x.device)), weight.to(x.device, x.dtype),
                                        None if m.bias is None else m.bias)
        return hook

    def add_output(delta: torch.Tensor):
        def hook(_m, _args, out):
            return out + delta.to(out.device, out.dtype)
        return hook

    units = [(adapter.ffn_out(layer), ex.ffn[i], ex.ffn_out, ex.ffn_bias)]
    if ex.heads is not None:
        q_idx, _, _, _ = head_index_sets(adapter, layer, ex.heads[i], head_unit)
        units.append((adapter.attn_out(layer), q_idx, ex.attn_out, ex.attn_bias))
    for lin, keep, refit, bias in units:
        hooks.append((lin, "post", refitted(keep, refit[i])) if refit is not None
                     else (lin, "pre", zero_inputs(keep, lin.in_features)))
        if bias is not None:
            hooks.append((lin, "post", add_output(bias[i])))
    return hooks


@contextmanager
def layer_masked(layer: nn.Module, adapter: Adapter, ex: Expert, i: int, head_unit: str | None) -> Iterator[nn.Module]:
    """Decoder layer i computing expert `ex` by hooks (no weight changes); removed on exit."""
    with hooked(_mask_hooks(layer, adapter, ex, i, head_unit)):
        yield layer


@contextmanager
def masked(model: nn.Module, adapter: Adapter, plan: Plan, expert: str | None = None) -> Iterator[nn.Module]:
    """The plan as zero masks (and refitted outputs) on the dense model, for comparison; hooks
    removed on exit."""
    _, ex = plan.expert(expert)
    with hooked(h for i, layer in enumerate(adapter.layers(model)) for h in _mask_hooks(layer, adapter, ex, i, plan.head_unit)):
        yield model


def unique_tensors(tensors: Iterable[torch.Tensor | None], seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Each tensor once (a tied embedding is one tensor); `seen` carries over between calls."""
    seen = set() if seen is None else seen
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield t


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in unique_tensors(model.parameters()))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters (tied tensors once)."""
    return sum(p.numel() * p.element_size() for p in unique_tensors(model.parameters()))


def ffn_params(model: nn.Module, adapter: Adapter) -> int:
    total = 0
    for layer in adapter.layers(model):
        for lin in (*adapter.ffn_in(layer), adapter.ffn_out(layer)):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total

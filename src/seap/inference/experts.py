"""One base model, many experts: each sequence of a batch runs on its own expert's reduced FFN.

The base weights are loaded once. For every expert, the kept rows of the FFN input linears
and columns of the output linear are gathered once (`materialize=True`: the memory the experts
add is reported by `memory()`), or gathered at every call (`materialize=False`: only the
indices are kept, slower). While `use()` is active the FFN linears of every layer are replaced
by routed ones that split the batch by expert, so a mixed batch computes, row for row, exactly
what each sequence computes alone on its sliced model. Pruned heads (plans built with head
pruning) are applied the same way on the attention output projection. Leaving `use()` puts the
original linears back.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.adapters.base import by_sequence, module_path, set_module
from ..model.fingerprints import check_fingerprint
from ..model.loading import LoadedModel
from ..pruning.plan import Expert, Plan
from ..pruning.surgery import head_index_sets, unique_tensors
from .decoding import generate_texts
from .router import Route, Router

log = logging.getLogger(__name__)


def merge_experts(plans: Plan | Sequence[Plan]) -> tuple[dict[str, Expert], dict[str, Plan]]:
    """Experts of one or more plans by name (a name used by two plans is an error)."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    if not plans:
        raise ConfigError("give at least one plan")
    experts: dict[str, Expert] = {}
    owner: dict[str, Plan] = {}
    for plan in plans:
        for name, ex in plan.experts.items():
            if name in experts:
                raise ConfigError(f"expert {name!r} is in two of the plans: give each task's plan once")
            experts[name], owner[name] = ex, plan
    return experts, owner


@dataclass
class _Slot:
    """One expert's weights for one linear: gathered (materialised) or gathered on the fly."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    index: torch.Tensor  # kept rows (input linears) or columns (output linears) of the base weight
    width: int


class _RoutedLinear(nn.Module):
    """Stands in for one FFN (or attention output) linear while experts are routed."""

    def __init__(self, base: nn.Linear, slots: dict[str, _Slot], rows_in: bool, state: dict):
        super().__init__()
        self.base, self.slots, self.rows_in, self.state = base, slots, rows_in, state

    def _weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.slots[name]
        if s.weight is not None:
            return s.weight, s.bias
        w = self.base.weight.index_select(0 if self.rows_in else 1, s.index)
        b = self.base.bias
        if self.rows_in:
            return w, None if b is None else b.index_select(0, s.index)
        return w, s.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups: list[tuple[str, torch.Tensor | None]] = self.state["groups"]
        if len(groups) == 1:  # every sequence on one expert: one plain linear
            w, b = self._weights(groups[0][0])
            return F.linear(x if self.rows_in else x[..., : w.shape[1]], w, b)
        shape = x.shape
        x = by_sequence(x, self.state["batch"])
        width = max(self.slots[n].width for n, _ in groups) if self.rows_in else self.base.out_features
        y = x.new_zeros(x.shape[0], x.shape[1], width)
        for name, rows in groups:
            w, b = self._weights(name)
            xi = x.index_select(0, rows)
            # Input linears write an expert's channels first; the rest of a row is padding that
            # the output linear never reads (it takes only its expert's width).
            if self.rows_in:
                y[rows, :, : w.shape[0]] = F.linear(xi, w, b)
            else:
                y[rows] = F.linear(xi[..., : w.shape[1]], w, b)
        return y.reshape(*shape[:-1], width)


class _HeadGather(nn.Module):
    """Attention output projection of an expert with pruned heads: keep its heads' channels."""

    def __init__(self, base: nn.Linear, slots: dict[str, _Slot], state: dict):
        super().__init__()
        self.inner = _RoutedLinear(base, slots, rows_in=False, state=state)
        self.slots, self.state = slots, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.state["groups"]
        if len(groups) == 1:
            return self.inner(x.index_select(-1, self.slots[groups[0][0]].index))
        shape = x.shape
        x = by_sequence(x, self.state["batch"])
        width = max(self.slots[n].width for n, _ in groups)
        picked = x.new_zeros(x.shape[0], x.shape[1], width)
        for name, rows in groups:
            idx = self.slots[name].index
            picked[rows, :, : len(idx)] = x.index_select(0, rows).index_select(-1, idx)
        return self.inner(picked).reshape(*shape[:-1], -1)


class MultiExpertModel:
    """A base model with several experts of its plans, and optionally a router that picks them."""

    def __init__(self, lm: LoadedModel, plans: Plan | Sequence[Plan], router: Router | None = None, *,
                 experts: Sequence[str] | None = None, materialize: bool = True):
        all_experts, owner = merge_experts(plans)
        for plan in {id(p): p for p in owner.values()}.values():
            check_fingerprint(plan.meta.fingerprint, lm.model, lm.adapter)
        if router is not None:
            router.check_model(lm.model, lm.adapter)
            router.check_experts(all_experts)
            if experts is None:  # only what the router can pick
                experts = [n for n in all_experts if n in set(router.experts.values())]
        if experts is not None:
            unknown = [e for e in experts if e not in all_experts]
            if unknown:
                raise ConfigError(f"no expert {unknown} in the plans: choose from {', '.join(all_experts)}")
            all_experts = {e: all_experts[e] for e in experts}
        self.lm, self.router, self.experts, self.materialize = lm, router, all_experts, materialize
        self._owner = owner
        self._state: dict = {"groups": [], "batch": 1}
        self._replacements = self._build()

    # -- weights --------------------------------------------------------------------------
    @torch.no_grad()
    def _build(self) -> list[tuple[str, nn.Module, nn.Module]]:
        """(module path, original linear, routed replacement) for every linear an expert changes."""
        model, adapter = self.lm.model, self.lm.adapter
        out = []
        for i, layer in enumerate(adapter.layers(model)):
            for lin in adapter.ffn_in(layer):
                slots = {n: self._slot(lin, ex.ffn[i], rows=True) for n, ex in self.experts.items()}
                out.append((module_path(model, lin), lin, _RoutedLinear(lin, slots, True, self._state)))
            down = adapter.ffn_out(layer)
            slots = {n: self._slot(down, ex.ffn[i], rows=False,
                                   delta=None if ex.ffn_bias is None else ex.ffn_bias[i],
                                   refit=None if ex.ffn_out is None else ex.ffn_out[i])
                     for n, ex in self.experts.items()}
            out.append((module_path(model, down), down, _RoutedLinear(down, slots, False, self._state)))
            if any(ex.heads is not None for ex in self.experts.values()):
                o = adapter.attn_out(layer)
                slots = {}
                for n, ex in self.experts.items():
                    plan = self._owner[n]
                    q_idx = (torch.arange(o.in_features) if ex.heads is None else
                             head_index_sets(adapter, layer, ex.heads[i], plan.head_unit)[0])
                    slots[n] = self._slot(o, q_idx, rows=False,
                                          delta=None if ex.attn_bias is None else ex.attn_bias[i],
                                          refit=None if ex.attn_out is None else ex.attn_out[i])
                out.append((module_path(model, o), o, _HeadGather(o, slots, self._state)))
        return out

    def _slot(self, lin: nn.Linear, idx: torch.Tensor, rows: bool, delta: torch.Tensor | None = None,
              refit: torch.Tensor | None = None) -> _Slot:
        idx = idx.to(lin.weight.device, torch.long)
        dim = 0 if rows else 1
        full = len(idx) == lin.weight.shape[dim] and torch.equal(idx, torch.arange(len(idx), device=idx.device))
        weight = None
        if refit is not None:  # reconstruction: the expert's own output weights, whatever `materialize` says
            weight = refit.to(lin.weight.device, lin.weight.dtype)
        elif self.materialize:  # a dense expert shares the base weight
            weight = lin.weight if full else lin.weight.index_select(dim, idx)
        if rows:
            bias = None if lin.bias is None else (lin.bias if full else lin.bias.index_select(0, idx))
            return _Slot(weight, bias, idx, len(idx))
        bias = lin.bias
        if delta is not None:  # FLAP bias compensation: base bias (or zero) + the expert's delta
            base = torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device) if bias is None else bias
            bias = base + delta.to(base.device, base.dtype)
        return _Slot(weight, bias, idx, len(idx))

    def memory(self) -> dict:
        """Bytes of the base model and what the experts add over it (shared tensors counted once)."""
        seen: set[int] = set()
        base = sum(p.numel() * p.element_size() for p in unique_tensors(self.lm.model.parameters(), seen))
        per_expert = {n: 0 for n in self.experts}
        for _, _, rep in self._replacements:
            for n, s in rep.slots.items():
                per_expert[n] += sum(t.numel() * t.element_size()
                                     for t in unique_tensors((s.weight, s.bias, s.index), seen))
        added = sum(per_expert.values())
        return {"base_bytes": base, "added_bytes": added, "added_fraction": added / base,
                "per_expert_bytes": per_expert, "materialized": self.materialize}

    # -- routing --------------------------------------------------------------------------
    def route(self, prompts: Sequence[str]) -> list[Route]:
        if self.router is None:
            raise ConfigError("this multi-expert model has no router: give one, or name the experts to use")
        routes = self.router.route(self.lm, prompts)
        for r in routes:
            if r.expert not in self.experts:
                raise ConfigError(f"the router chose expert {r.expert!r}, which was not loaded")
        return routes

    @contextmanager
    def use(self, experts: str | Sequence[str], batch: int | None = None) -> Iterator[nn.Module]:
        """The base model with sequence b running on `experts[b]` (one name: every sequence)."""
        names = [experts] * (batch or 1) if isinstance(experts, str) else list(experts)
        unknown = sorted(set(names) - set(self.experts))
        if unknown:
            raise ConfigError(f"no expert {unknown} loaded: choose from {', '.join(self.experts)}")
        if isinstance(experts, str) or len(set(names)) == 1:
            self._state["groups"], self._state["batch"] = [(names[0], None)], len(names)
        else:
            by: dict[str, list[int]] = {}
            for b, n in enumerate(names):
                by.setdefault(n, []).append(b)
            device = self.lm.model.device
            self._state["groups"] = [(n, torch.tensor(rows, device=device)) for n, rows in by.items()]
            self._state["batch"] = len(names)
        model = self.lm.model
        try:
            for path, _, rep in self._replacements:
                set_module(model, path, rep)
            yield model
        finally:
            for path, orig, _ in self._replacements:
                set_module(model, path, orig)
            self._state["groups"], self._state["batch"] = [], 1

    def experts_for(self, prompts: Sequence[str], experts: Sequence[str] | str | None) -> list[str]:
        if experts is None:
            return [r.expert for r in self.route(prompts)]
        names = [experts] * len(prompts) if isinstance(experts, str) else list(experts)
        if len(names) != len(prompts):
            raise ConfigError(f"{len(names)} experts for {len(prompts)} prompts: give one per prompt")
        return names

    def kept_fraction(self, name: str) -> float:
        """Share of the base model's FFN neurons that expert `name` keeps."""
        adapter = self.lm.adapter
        return sum(self.experts[name].widths()) / sum(adapter.d_ff(layer) for layer in adapter.layers(self.lm.model))

    def generate(self, prompts: Sequence[str], *, experts: Sequence[str] | str | None = None,
                 max_new_tokens: int = 64, special_tokens: bool = True,
                 stop: Sequence[str] = ()) -> tuple[list[str], list[str]]:
        """Greedy continuations of a batch of prompts, each on its expert (cut at its first stop
        string); returns (texts, experts)."""
        if not prompts:
            raise ConfigError("no prompt given")
        names = self.experts_for(prompts, experts)
        with self.use(names):
            texts, _ = generate_texts(self.lm, prompts, max_new_tokens, stop=stop, special_tokens=special_tokens)
        return texts, names

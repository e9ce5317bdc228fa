"""What plan building reads from a model's weights, whether the model is in memory or not.

Scores need only per-unit norms of the output (and input) linears, and a fingerprint needs a few
strided samples: small vectors per layer (`LayerWeights`). They are computed once per layer, from
a module in memory (`ModuleWeights`) or during the layer-by-layer pass, while each layer is
loaded anyway (`CheckpointWeights`, which reads full matrices from the shards only for bias
compensation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter

SIGNATURE_SAMPLES = 64
_BLOCK = 2048


@dataclass
class UnitWeights:
    """Norms of the weights attached to each of C channels (float64, [C] each)."""

    col_sq: torch.Tensor  # ||W_out[:, j]||^2
    col_absmean: torch.Tensor  # mean_i |W_out[i, j]|
    in_norm: torch.Tensor | None = None  # prod over the input linears of ||W_in[j]|| (FFN only)

    @classmethod
    def of(cls, w_out: torch.Tensor, w_in: list[torch.Tensor] | None = None) -> UnitWeights:
        # float64 in column blocks: exact norms without a float64 copy of a whole 8B-size matrix
        w_out = w_out.detach()
        sq, am = [], []
        for c in range(0, w_out.shape[1], _BLOCK):
            w = w_out[:, c:c + _BLOCK].double()
            sq.append(w.pow(2).sum(0))
            am.append(w.abs().mean(0))
        in_norm = None
        if w_in is not None:
            in_norm = torch.ones(w_out.shape[1], dtype=torch.float64, device=w_out.device)
            for lin in w_in:
                rows = [lin[r:r + _BLOCK].detach().double().norm(dim=1) for r in range(0, lin.shape[0], _BLOCK)]
                in_norm = in_norm * torch.cat(rows)
            in_norm = in_norm.cpu()
        return cls(torch.cat(sq).cpu(), torch.cat(am).cpu(), in_norm)

    @property
    def channels(self) -> int:
        return int(self.col_sq.numel())


def signature_positions(numel: int) -> list[int]:
    step = max(1, numel // SIGNATURE_SAMPLES)
    return list(range(0, numel, step))[:SIGNATURE_SAMPLES]


def signature_of(w_out: torch.Tensor) -> list[float]:
    """Strided samples of a layer's FFN output weight: what tells two checkpoints apart."""
    flat = w_out.detach().reshape(-1)
    idx = torch.tensor(signature_positions(flat.numel()), device=flat.device)
    return flat[idx].float().cpu().tolist()


@dataclass
class LayerWeights:
    ffn: UnitWeights
    attn: UnitWeights

    @classmethod
    def of_layer(cls, layer: nn.Module, adapter: Adapter) -> LayerWeights:
        return cls(UnitWeights.of(adapter.ffn_out(layer).weight, [lin.weight for lin in adapter.ffn_in(layer)]),
                   UnitWeights.of(adapter.attn_out(layer).weight))


class WeightSource:
    """Per-layer weight summaries, fingerprint samples and, for bias compensation, output matrices."""

    def layer(self, i: int) -> LayerWeights:
        raise NotImplementedError

    def signature(self, i: int) -> list[float]:
        raise NotImplementedError

    def out_weight(self, i: int, kind: str) -> torch.Tensor:
        """W_d ('ffn') or W_o ('attn') of layer i, [d, C]."""
        raise NotImplementedError


class ModuleWeights(WeightSource):
    """A model in memory."""

    def __init__(self, model: nn.Module, adapter: Adapter):
        self.layers, self.adapter = adapter.layers(model), adapter
        self._cache: dict[int, LayerWeights] = {}

    def layer(self, i: int) -> LayerWeights:
        if i not in self._cache:
            self._cache[i] = LayerWeights.of_layer(self.layers[i], self.adapter)
        return self._cache[i]

    def signature(self, i: int) -> list[float]:
        return signature_of(self.adapter.ffn_out(self.layers[i]).weight)

    def out_weight(self, i: int, kind: str) -> torch.Tensor:
        lin = self.adapter.ffn_out(self.layers[i]) if kind == "ffn" else self.adapter.attn_out(self.layers[i])
        return lin.weight.detach()


class CheckpointWeights(WeightSource):
    """A model on disk: summaries measured during the layer-by-layer pass (or by a pass over the
    weights alone when there was none), fingerprint samples and matrices read when asked."""

    def __init__(self, summaries: list[LayerWeights] | None, signatures, read_out_weight, summarise=None):
        self.summaries = summaries
        self._signatures = signatures  # a list, or a callable that reads them
        self._read = read_out_weight  # (layer index, 'ffn' | 'attn') -> tensor
        self._summarise = summarise  # () -> list[LayerWeights], one layer in memory at a time

    def layer(self, i: int) -> LayerWeights:
        if self.summaries is None:
            if self._summarise is None:
                raise RuntimeError("no weight summaries: run the layer-by-layer pass first")
            self.summaries = self._summarise()
        return self.summaries[i]

    def signature(self, i: int) -> list[float]:
        if callable(self._signatures):
            self._signatures = self._signatures()
        return self._signatures[i]

    def out_weight(self, i: int, kind: str) -> torch.Tensor:
        return self._read(i, kind)

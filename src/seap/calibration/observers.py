"""The observers of a calibration pass (seap.calibration.engine.run_pass): each gets the inputs of a
layer's output linears on every batch (`add`, padding already dropped on a CPU or given as a mask),
starts afresh for each layer (`start`), and gives the caller its layer's result, summed across
processes under torch.distributed. One with an `outputs` method also gets the layer's outputs.

`StatsObserver` (activation statistics per corpus, §2.1), `GramObserver` (first and second moments per
group of corpora, §2.8), `PriorObserver` (GRIFFIN's generic prior, §2.6) and `PooledOutputs` (each
text's pooled layer outputs: the hidden-state probe of `seap analyze clusters`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.reconstruct import Moments
from ..core.scores import squared_neuron_scores
from . import distributed as dist
from .gram import GramAccumulator
from .stats import ChannelStats, DeviceStats


class StatsObserver:
    """Activation statistics (count, mean, M2, sum of squares) of the FFN output linear's input (and the
    attention output's with `heads`), one set per corpus label."""

    name = "stats"

    def __init__(self, labels: Sequence[str], heads: bool):
        self.labels, self.kinds = sorted(set(labels)), ("ffn", "attn") if heads else ("ffn",)
        self.acc: dict[str, dict[str, DeviceStats]] = {}

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        self.acc = {lab: {k: DeviceStats(linears[k].in_features, linears[k].weight.device) for k in self.kinds}
                    for lab in self.labels}

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        if kind in self.kinds:
            self.acc[label][kind].add(x.reshape(-1, x.shape[-1]), mask)

    def result(self) -> dict[str, dict[str, ChannelStats]]:
        """label -> kind -> statistics summed over every process's share of the texts."""
        return {lab: {k: dist.merge_channel_stats(a.result()) for k, a in kinds.items()}
                for lab, kinds in self.acc.items()}


class GramObserver:
    """The moments (count, sum, Gram matrix) of the output linears' inputs for each group of corpus labels
    (an expert's corpora): one Gram matrix per group and kind, accumulated only for the layers the
    caller marks as needing one (a layer kept dense needs no refit)."""

    name = "gram"

    def __init__(self, groups: Mapping[str, Sequence[str]], kinds: Sequence[str]):
        self.groups, self.kinds = {g: set(ls) for g, ls in groups.items()}, tuple(kinds)
        self.acc: dict[str, dict[str, GramAccumulator]] = {}

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        self.acc = {} if skip else {g: {k: GramAccumulator(linears[k].in_features, linears[k].weight.device)
                                        for k in self.kinds} for g in self.groups}

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        for g, labels in self.groups.items():
            if label in labels and kind in self.kinds and g in self.acc:
                self.acc[g][kind].add(x, mask)

    def result(self) -> dict[str, dict[str, Moments]]:
        out = {}
        for g, kinds in self.acc.items():
            out[g] = {}
            for k, a in kinds.items():
                a.flush()  # the float32 partial belongs to this process's sum: merge it before the all-reduce
                dist.all_reduce_sum(a.count, a.total, a.gram)
                out[g][k] = a.result()
        self.acc = {}  # the Gram matrices live only as long as the caller's decision needs them
        return out


class PriorObserver:
    """GRIFFIN's corpus statistic (seap.inference.griffin.corpus_statistic) of each layer: the sum over real tokens
    of z_tj^2 / ||z_t||^2 for the FFN output linear's input z, summed across processes."""

    name = "prior"
    kinds = ("ffn",)

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def start(self, linears: Mapping[str, nn.Module], skip: bool) -> None:
        self.total = torch.zeros(linears["ffn"].in_features, dtype=torch.float64, device=linears["ffn"].weight.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.total.device)

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        if kind != "ffn":
            return
        self.total += squared_neuron_scores(x[None], None if mask is None else mask[None])[0].double()
        self.count += x.shape[0] if mask is None else mask.sum(dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, int]:
        """(the layer's sum, the real tokens it is over), over every process."""
        dist.all_reduce_sum(self.total, self.count)
        return self.total, int(self.count)


class PooledOutputs:
    """Every layer's outputs pooled per text over its real tokens (the mean, or the last token):
    [n_layers, n_texts, hidden] float32. `rows[b]`: the texts of batch b (stats.indexed_batches)."""

    name = "pooled"

    def __init__(self, n_layers: int, rows: Sequence[Sequence[int]], hidden: int, pool: str = "mean"):
        self.rows = [torch.as_tensor(r, dtype=torch.int64) for r in rows]
        self.pool = pool
        self.pooled = torch.zeros(n_layers, sum(len(r) for r in rows), hidden)

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        pass

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        pass

    def outputs(self, i: int, outputs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        for rows, h, m in zip(self.rows, outputs, masks):
            m = m.to(h.device, h.dtype)  # [B, S]
            if self.pool == "mean":
                v = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            else:  # the last real token, wherever the padding is
                last = (m * torch.arange(m.shape[1], dtype=m.dtype, device=m.device)).argmax(1)
                v = h[torch.arange(h.shape[0], device=h.device), last]
            self.pooled[i, rows] = v.float().cpu()

    def result(self) -> torch.Tensor:
        return self.pooled

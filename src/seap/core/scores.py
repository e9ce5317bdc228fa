"""Importance scores per prunable unit (docs/design.md §2.2). Pure functions of tensors: higher = keep.

Shapes: W_d is [d, C] (the output linear: d outputs, C channels); W_in rows are [C, d]. The weights
enter as per-channel norms (`Norms`: seap.model.weights.UnitWeights), so a model need not be in memory.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import ConfigError

SCORES = ("wifv", "wifn", "wanda_sp", "magnitude", "random")
DATA_FREE = ("magnitude", "random")


class Stats(Protocol):
    """What the scores read of a layer's activation statistics (seap.calibration.stats.ChannelStats)."""

    @property
    def var(self) -> torch.Tensor: ...  # [C] variance of z_j over the calibration tokens

    @property
    def mean_sq(self) -> torch.Tensor: ...  # [C] mean of z_j^2

    @property
    def l2(self) -> torch.Tensor: ...  # [C] ||z_j||_2 over the tokens


class Norms(Protocol):
    """What the scores read of a layer's weight norms (seap.model.weights.UnitWeights)."""

    col_sq: torch.Tensor  # [C] ||W_out[:, j]||^2
    col_absmean: torch.Tensor  # [C] mean_i |W_out[i, j]|
    in_norm: torch.Tensor | None  # [C] product of the input linears' row norms (FFN only)

    @property
    def channels(self) -> int: ...


def wifv(stats: Stats, w: Norms) -> torch.Tensor:
    """FLAP's fluctuation metric (SEAP's s_F): var_j * ||W_d[:, j]||^2."""
    return stats.var * w.col_sq


def wifn(stats: Stats, w: Norms) -> torch.Tensor:
    """SEAP's s_W: sqrt(mean z_j^2) * ||W_d[:, j]||^2."""
    return stats.mean_sq.sqrt() * w.col_sq


def wanda_sp(stats: Stats, w: Norms) -> torch.Tensor:
    """Structured Wanda: mean_i |W_d[i, j]| * ||z_j||_2 over the calibration tokens."""
    return w.col_absmean * stats.l2


def magnitude(w: Norms) -> torch.Tensor:
    """Data-free: product of the row norms of the input linears (||W_g[j]|| * ||W_u[j]||); for
    attention, which has no per-channel input rows here, the output column norms."""
    return w.in_norm if w.in_norm is not None else w.col_sq.sqrt()


def random_scores(n: int, seed: int, salt: int) -> torch.Tensor:
    """A seeded control: the same (seed, layer, kind) always gives the same scores."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.rand(n, generator=g, dtype=torch.float64)


def channel_scores(kind: str, *, stats: Stats | None, weights: Norms, seed: int = 0,
                   salt: int = 0) -> torch.Tensor:
    """Scores of the C channels whose weight norms are `weights`."""
    if kind not in SCORES:
        raise ConfigError(f"unknown score {kind!r}: choose one of {', '.join(SCORES)}")
    if kind == "random":
        return random_scores(weights.channels, seed, salt)
    if kind == "magnitude":
        return magnitude(weights)
    if stats is None:
        raise ConfigError(f"score {kind!r} needs activation statistics: collect them or use magnitude/random")
    return {"wifv": wifv, "wifn": wifn, "wanda_sp": wanda_sp}[kind](stats, weights)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, best first; ties go to the lower index so equal scores always give
    the same choice."""
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best indices along the last dim ([..., C] -> [..., k] int64), in ascending order."""
    return ranking(scores)[..., :k].sort(dim=-1).values.to(torch.int64)


def group_scores(channel: torch.Tensor, group_width: int) -> torch.Tensor:
    """Average channel scores over consecutive groups (a head: head_dim channels; a KV group)."""
    return channel.reshape(-1, group_width).mean(1)


# -- GRIFFIN's statistic (§2.6): the flock of each channel over a prompt's tokens ---------------------
def neuron_scores(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S, F] activations (and [B, S] real-token mask) -> [B, F] GRIFFIN neuron scores."""
    return squared_neuron_scores(z, mask).sqrt()


def squared_neuron_scores(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, F] sum_t mask_t z_tj^2 / ||z_t||^2: the squares of `neuron_scores`, which sum over tokens."""
    # ||z_t / ||z_t|| ||_col = sqrt(sum_t w_t z_t^2) with w_t = mask_t / ||z_t||^2: one square, one
    # row sum and one batched matmul instead of materialising the normalised rows (prefill cost).
    sq = z.float().square()
    w = 1.0 / sq.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    if mask is not None:
        w = w * mask.to(w.device, w.dtype)
    return torch.bmm(w[:, None, :], sq)[:, 0]

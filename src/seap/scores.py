"""Importance scores per prunable unit (DESIGN 2.2). Pure functions of tensors: higher = keep.

Shapes: W_d is [d, C] (the output linear: d outputs, C channels); W_in rows are [C, d].
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .stats import ChannelStats

SCORES = ("wifv", "wifn", "wanda_sp", "magnitude", "random")
DATA_FREE = ("magnitude", "random")


def _col_sq_norm(w_out: torch.Tensor) -> torch.Tensor:
    return w_out.detach().double().pow(2).sum(0)  # ||W_d[:, j]||^2, [C]


def wifv(stats: ChannelStats, w_out: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric (SEAP's s_F): var_j * ||W_d[:, j]||^2."""
    return stats.var * _col_sq_norm(w_out)


def wifn(stats: ChannelStats, w_out: torch.Tensor) -> torch.Tensor:
    """SEAP's s_W: sqrt(mean z_j^2) * ||W_d[:, j]||^2."""
    return stats.mean_sq.sqrt() * _col_sq_norm(w_out)


def wanda_sp(stats: ChannelStats, w_out: torch.Tensor) -> torch.Tensor:
    """Structured Wanda: mean_i |W_d[i, j]| * ||z_j||_2 over the calibration tokens."""
    return w_out.detach().double().abs().mean(0) * stats.l2


def magnitude(w_in: list[torch.Tensor]) -> torch.Tensor:
    """Data-free: product of the row norms of the input linears (||W_g[j]|| * ||W_u[j]||)."""
    out = torch.ones(w_in[0].shape[0], dtype=torch.float64)
    for w in w_in:
        out = out * w.detach().double().norm(dim=1)
    return out


def random_scores(n: int, seed: int, salt: int) -> torch.Tensor:
    """A seeded control: the same (seed, layer, kind) always gives the same scores."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.rand(n, generator=g, dtype=torch.float64)


def channel_scores(kind: str, *, stats: ChannelStats | None, w_out: torch.Tensor,
                   w_in: list[torch.Tensor] | None = None, seed: int = 0, salt: int = 0) -> torch.Tensor:
    """Scores of the C channels feeding ``w_out`` ([d, C])."""
    if kind not in SCORES:
        raise ConfigError(f"unknown score {kind!r}: choose one of {', '.join(SCORES)}")
    if kind == "random":
        return random_scores(w_out.shape[1], seed, salt)
    if kind == "magnitude":
        if w_in is None:  # attention: use the output columns and no data
            return w_out.detach().double().norm(dim=0)
        return magnitude(w_in)
    if stats is None:
        raise ConfigError(f"score {kind!r} needs activation statistics: collect them or use magnitude/random")
    return {"wifv": wifv, "wifn": wifn, "wanda_sp": wanda_sp}[kind](stats, w_out)


def group_scores(channel: torch.Tensor, group_width: int) -> torch.Tensor:
    """Average channel scores over consecutive groups (a head: head_dim channels; a KV group)."""
    return channel.reshape(-1, group_width).mean(1)

"""Streaming activation statistics (docs/design.md §2.1).

Per channel of the FFN output linear's input z (and of the attention output's input when heads
are pruned): token count N, mean, M2 (sum of squared deviations) and sum of squares, over the
non-padding tokens of a corpus. Each batch is reduced in float32 on the compute device and merged
into float64 running values there (Chan's formula), so batches, halves of a corpus and whole
corpora combine exactly and a GPU never waits for the host.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import save_tensors
from ..errors import ArtifactError, DataError
from ..outputs import check_header

log = logging.getLogger(__name__)

STATS_FORMAT = "seap-stats"
STATS_VERSION = 1


@dataclass
class ChannelStats:
    """Running statistics of one layer's channels, shape [C] each (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    sumsq: torch.Tensor

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        z = torch.zeros(channels, dtype=torch.float64)
        return cls(0, z.clone(), z.clone(), z.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> ChannelStats:
        """Statistics of a [tokens, C] block in one shot."""
        x = x.detach().to(torch.float64)
        mean = x.mean(0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64)
        return cls(len(x), mean, ((x - mean) ** 2).sum(0), (x * x).sum(0))

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Chan et al.'s parallel combination; exact for any split of the tokens."""
        n = self.count + other.count
        if other.count == 0:
            return ChannelStats(self.count, self.mean.clone(), self.m2.clone(), self.sumsq.clone())
        if self.count == 0:
            return ChannelStats(other.count, other.mean.clone(), other.m2.clone(), other.sumsq.clone())
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return ChannelStats(n, mean, m2, self.sumsq + other.sumsq)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sumsq / max(self.count, 1)

    @property
    def l2(self) -> torch.Tensor:
        """||z_j||_2 over all tokens."""
        return self.sumsq.sqrt()


@dataclass
class ActivationStats:
    """Statistics of one corpus through one model: FFN channels per layer (+ attention channels)."""

    ffn: list[ChannelStats]
    attn: list[ChannelStats] | None
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.ffn[0].count if self.ffn else 0

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Sum of two corpora (or two halves of one) without re-running the model."""
        if self.meta.get("fingerprint") != other.meta.get("fingerprint"):
            raise ArtifactError("cannot merge statistics of different models: collect both with the same base model")
        if len(self.ffn) != len(other.ffn) or (self.attn is None) != (other.attn is None):
            raise ArtifactError("cannot merge statistics with different layers or head settings")
        attn = None if self.attn is None else [a.merge(b) for a, b in zip(self.attn, other.attn)]
        meta = dict(self.meta)
        names = [self.meta.get("corpus", "?"), other.meta.get("corpus", "?")]
        meta["corpus"] = "+".join(n for n in names if n)
        meta["n_texts"] = int(self.meta.get("n_texts", 0)) + int(other.meta.get("n_texts", 0))
        merged = ActivationStats([a.merge(b) for a, b in zip(self.ffn, other.ffn)], attn, meta)
        merged.meta["n_tokens"] = merged.n_tokens
        return merged

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for kind, group in (("ffn", self.ffn), ("attn", self.attn or [])):
            for i, s in enumerate(group):
                tensors[f"{kind}.{i}.mean"] = s.mean.contiguous()
                tensors[f"{kind}.{i}.m2"] = s.m2.contiguous()
                tensors[f"{kind}.{i}.sumsq"] = s.sumsq.contiguous()
                tensors[f"{kind}.{i}.count"] = torch.tensor([s.count], dtype=torch.int64)
        header = dict(self.meta, format=STATS_FORMAT, version=STATS_VERSION, n_layers=len(self.ffn),
                      heads=self.attn is not None, n_tokens=self.n_tokens)
        save_tensors(path, tensors, metadata={"seap": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"statistics file {path} does not exist: run `seap collect` first or fix the path")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {}).get("seap", "null"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
            raise ArtifactError(f"statistics file {path} is corrupt or truncated ({err}): delete it and collect again") from None
        check_header(header, path, kind="statistics", fmt=STATS_FORMAT, version=STATS_VERSION, redo="collect again")
        try:
            def group(kind: str, n: int) -> list[ChannelStats]:
                return [ChannelStats(int(tensors[f"{kind}.{i}.count"][0]), tensors[f"{kind}.{i}.mean"],
                                     tensors[f"{kind}.{i}.m2"], tensors[f"{kind}.{i}.sumsq"]) for i in range(n)]

            n = int(header["n_layers"])
            ffn = group("ffn", n)
            attn = group("attn", n) if header.get("heads") else None
        except (KeyError, IndexError) as err:
            raise ArtifactError(f"statistics file {path} is incomplete (missing {err}): collect again") from None
        meta = {k: v for k, v in header.items() if k not in ("format", "version", "n_layers", "heads")}
        return cls(ffn, attn, meta)


class DeviceStats:
    """Running statistics of one layer's channels kept on the compute device.

    Each batch is reduced in float32 (count, mean, M2 and sum of squares of its real tokens) and
    merged into float64 running values with Chan's formula, all as device tensors: no `.item()`, no
    boolean indexing, so a GPU never waits for the host between batches. Padding is excluded with
    `where`, not a product, so that NaNs in fully masked padding rows cannot leak in.
    """

    def __init__(self, channels: int, device: torch.device):
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean, self.m2, self.sumsq = z, z.clone(), z.clone()

    def add(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        """x: [T, C] activations; keep: [T] bool, True for real tokens (None: all)."""
        x = x.detach().float()
        if keep is None:
            n = torch.full((), float(x.shape[0]), device=x.device)
        else:
            keep = keep.to(x.device)[:, None]
            x = torch.where(keep, x, 0.0)
            n = keep.sum(dtype=torch.float32)
        mean_b = x.sum(0) / n.clamp_min(1)
        dev = x - mean_b
        if keep is not None:
            dev = torch.where(keep, dev, 0.0)
        m2_b, sq_b = (dev * dev).sum(0), (x * x).sum(0)
        n64 = n.double()
        total = self.count + n64
        frac = n64 / total.clamp_min(1)
        delta = mean_b.double() - self.mean
        self.m2 = self.m2 + m2_b.double() + delta * delta * self.count * frac
        self.mean = self.mean + delta * frac
        self.sumsq = self.sumsq + sq_b.double()
        self.count = total

    def result(self) -> ChannelStats:
        return ChannelStats(int(round(float(self.count.item()))), self.mean.cpu(), self.m2.cpu(), self.sumsq.cpu())


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """The corpus tokenised into padded batches of texts of similar token counts (the least padding;
    statistics do not depend on the order). One definition for every calibration pass."""
    return [enc for _, enc in indexed_batches(tokenizer, texts, batch_size, max_length)]


def indexed_batches(tokenizer, texts: Sequence[str], batch_size: int,
                    max_length: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """`batches`, each with the positions in `texts` of its rows (for a result per text)."""
    kept = [i for i, t in enumerate(texts) if t and t.strip()]
    if not kept:
        raise DataError("the corpus has no non-empty texts: give a task with rows or a file with text")
    enc = tokenizer([texts[i] for i in kept], return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1)
    order = sorted(range(len(kept)), key=lambda i: (int(lengths[i]), i))
    left = getattr(tokenizer, "padding_side", "right") == "left"
    out = []
    for b in range(0, len(kept), batch_size):
        rows = torch.tensor(order[b:b + batch_size])
        width = int(lengths[rows].max())
        cols = slice(ids.shape[1] - width, None) if left else slice(0, width)
        out.append(([kept[r] for r in rows.tolist()],
                    {"input_ids": ids[rows][:, cols].contiguous(), "attention_mask": mask[rows][:, cols].contiguous()}))
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":  # pinned memory: the copy does not wait for the GPU's queue
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def position_limit(config, max_length: int) -> int:
    """Longer texts than the model has positions for would crash inside the embedding."""
    return min(max_length, int(getattr(config, "max_position_embeddings", max_length) or max_length))


def finish_stats(ffn: list[ChannelStats], attn: list[ChannelStats] | None, meta: dict | None, *, n_texts: int,
                 max_length: int) -> ActivationStats:
    stats = ActivationStats(ffn, attn, dict(meta or {}))
    stats.meta["n_texts"] = n_texts
    stats.meta["n_tokens"] = stats.n_tokens
    stats.meta["max_length"] = max_length
    return stats

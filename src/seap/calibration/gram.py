"""The Gram accumulator (docs/design.md §2.8, §2.10): the moments of one linear's inputs (token count, sum
and Gram matrix) summed on the device while the calibration engine runs a layer's batches; the maths
that reads them is seap.core.reconstruct."""

from __future__ import annotations

import torch

from ..core import reconstruct as rec
from ..core.reconstruct import Moments


class GramAccumulator:
    """Sum, count and Gram matrix of one linear's inputs, on its device, with no host sync per batch on a
    GPU; padding excluded (zeroed with `where` where a mask is given).

    The products of a batch are added in float32 into a partial sum (the lower triangle only: half the
    work, in place, a block of rows at a time), which is merged into the float64 running sum every
    FLUSH_TOKENS tokens and at the end, so the conversion to float64 costs a few passes per layer rather
    than one per batch. Memory: the float64 sum and the float32 partial, 12 C^2 bytes, while a layer's
    batches run (less than the OBS choice needs after them)."""

    FLUSH_TOKENS = 8192

    def __init__(self, channels: int, device: torch.device):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self._part: torch.Tensor | None = None
        self._part_rows = 0
        self._mirrored = True

    def add(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if keep is not None:  # padding zeroed, not dropped: no host sync (the engine drops it on a CPU)
            keep = keep.reshape(-1, 1).to(x.device)
            x = torch.where(keep, x, 0.0)
            self.count += keep.sum(dtype=torch.float64)
        else:
            self.count += x.shape[0]
        self.total += x.sum(0).double()
        c = x.shape[1]
        if self._part is None:
            self._part = torch.zeros(c, c, dtype=torch.float32, device=x.device)
        for r, end in rec.blocks(c, rec.TRI_BLOCK):
            self._part[r:end, :end].addmm_(x[:, r:end].T, x[:, :end])
        self._part_rows += x.shape[0]
        self._mirrored = False
        if self._part_rows >= self.FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Merge the float32 partial into the float64 sum (before the sum is all-reduced or read)."""
        if self._part is None or not self._part_rows:
            return
        c = self.gram.shape[0]
        for r, end in rec.blocks(c, rec.ROW_BLOCK):
            self.gram[r:end, :end] += self._part[r:end, :end]
            self._part[r:end, :end].zero_()
        self._part_rows = 0

    def result(self) -> Moments:
        self.flush()
        self._part = None
        if not self._mirrored:
            c = self.gram.shape[0]
            for r, end in rec.blocks(c, rec.ROW_BLOCK):  # upper blocks from the lower ones
                self.gram[r:end, end:] = self.gram[end:, r:end].T
                blk = self.gram[r:end, r:end]
                blk.copy_(torch.tril(blk) + torch.tril(blk, -1).T)
            self._mirrored = True
        return Moments(int(round(float(self.count.item()))), self.total, self.gram)

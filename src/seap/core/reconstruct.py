"""Training-free reconstruction (docs/design.md §2.8): the maths of refitting each output linear.

After a plan has chosen the FFN channels K of a layer (and the head channels of its attention
output), the output linear y = W z + b is replaced by W' z_K + b' with

    W' = W[:, K] + W[:, R] S_RK (S_KK + lambda I)^-1,     b' = b + W mu - W' mu_K,

the least-squares fit of the dense layer's output on the calibration tokens (S the covariance of
z, mu its mean, lambda a ridge term relative to the mean of diag S_KK). Without a bias (`centered`
False, for runtimes whose architectures have no FFN bias: Gemma 3 in llama.cpp, vLLM), S is the
raw second moment and b' = b. FLAP's bias compensation is the special case W' = W[:, K].

Memory per layer of C channels (C = d_ff: 14,336 for an 8B model, 28,672 for a 70B): the float64
Gram matrix (8 C^2 bytes: 1.6 GB / 6.6 GB) plus, while the OBS choice runs, at most two C x C
float32 matrices (8 C^2 bytes together); the refit holds S_KK and one block of S_KR besides; every
other temporary is a block of ROW_BLOCK rows. So a layer needs about 16 C^2 bytes (3.3 GB at 8B,
13 GB at 70B) on top of its weights. The moments are summed by seap.calibration.gram, in the passes of seap.pruning.refit_pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)


ROW_BLOCK = 2048  # rows of a C x C matrix handled at once: bounds the temporaries to ROW_BLOCK x C
TRI_BLOCK = 1024  # rows of a lower-triangle update at once: finer blocks skip more of the upper triangle


def blocks(n: int, size: int):
    """(start, end) of consecutive blocks of `size` rows covering 0..n."""
    return ((r, min(r + size, n)) for r in range(0, n, size))


@dataclass
class Moments:
    """First and second moments of a layer's channels z over N tokens (float64)."""

    count: int
    total: torch.Tensor  # [C] sum of z
    gram: torch.Tensor  # [C, C] sum of z z^T

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def second(self, centered: bool, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Covariance (centered) or raw second moment per token, restricted to `rows` x `cols` (default:
        all), in `dtype`; built in blocks of rows so that no C x C temporary beyond the result exists."""
        n = max(self.count, 1)
        c = self.gram.shape[0]
        whole = rows is None
        rows = torch.arange(c, device=self.gram.device) if rows is None else rows.to(self.gram.device)
        cols = None if cols is None else cols.to(self.gram.device)
        out = torch.empty(len(rows), c if cols is None else len(cols), dtype=dtype, device=self.gram.device)
        mu = self.mean
        mu_c = mu if cols is None else mu[cols]
        for r in range(0, len(rows), ROW_BLOCK):
            idx = rows[r:r + ROW_BLOCK]
            block = self.gram[r:r + len(idx)] if whole else self.gram.index_select(0, idx)  # a view when whole
            if cols is not None:
                block = block.index_select(1, cols)
            block = block / n  # float64, the one temporary
            if centered:
                block.addr_(mu[idx], mu_c, alpha=-1)  # centred in float64, then rounded
            out[r:r + len(idx)] = block
        return out


@dataclass
class Refit:
    weight: torch.Tensor  # [d, |K|] float64
    bias_delta: torch.Tensor | None  # [d] float64, added to the linear's bias (None: no bias)
    # N (tr(X^T S_KR W_R^T) + lambda |X|^2), X = (W' - W_K)^T: how much less squared output error the refit
    # leaves than the cut with the mean compensated (centered) or the plain cut (not centered)
    explained: float = 0.0


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()


def _ridge(diag: torch.Tensor, ridge: float) -> float:
    """lambda: `ridge` x the mean of the diagonal, with a tiny floor that keeps a Cholesky factor
    defined for channels that never fired."""
    lam = ridge * float(diag.mean()) if ridge > 0 else 0.0
    return max(lam, 1e-12 * float(diag.abs().max().clamp_min(1e-30)))


def refit(w: torch.Tensor, kept: torch.Tensor, m: Moments, *, ridge: float = 1e-2, centered: bool = True) -> Refit:
    """The least-squares output weights over the kept channels (and the bias change when `centered`).

    `w`: [d, C] dense output weight; `kept`: channel indices; `ridge`: lambda relative to the mean of
    diag S_KK (0: the plain least-squares fit, which needs S_KK non-singular). Float64; memory: S_KK
    and its factor in place, S_KR W_R^T built in blocks of rows, never S or W whole in float64."""
    if ridge < 0:
        raise ConfigError(f"the ridge term must be >= 0, got {ridge}")
    dev = m.gram.device
    w = w.detach().to(dev)
    kept = kept.to(dev, torch.long)
    removed = _complement(kept, w.shape[1]).to(dev)
    w_k = w[:, kept].double()
    mu = m.mean.to(dev)
    if len(removed) and len(kept):
        a = m.second(centered, kept, kept)
        lam = _ridge(a.diagonal(), ridge)
        a.diagonal().add_(lam)
        # S_KR W_R^T: an input of the solve, formed in float32 (S itself holds float32 products)
        w_r_t = w[:, removed].T.float()  # [|R|, d]
        rhs = torch.empty(len(kept), w.shape[0], dtype=torch.float64, device=dev)
        for r in range(0, len(kept), ROW_BLOCK):
            rhs[r:r + ROW_BLOCK] = m.second(centered, kept[r:r + ROW_BLOCK], removed, dtype=torch.float32) @ w_r_t
        bias_r = w_r_t.T.double() @ mu[removed] if centered else None
        del w_r_t
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            del a
            x = torch.cholesky_solve(rhs, chol)  # [|K|, d]
        else:  # not positive definite even with the ridge: a least-squares solve still gives the fit
            x = torch.linalg.lstsq(a, rhs).solution
        del chol
        explained = max(m.count, 1) * (float((x * rhs).sum()) + lam * float((x * x).sum()))
        w_new = w_k + x.T
        del rhs, x
    else:
        w_new, bias_r = w_k.clone(), (w[:, removed].double() @ mu[removed] if centered else None)
        explained = 0.0
    # b' - b = W mu - W' mu_K = W_R mu_R + (W_K - W') mu_K
    delta = (bias_r + (w_k - w_new) @ mu[kept]) if centered else None
    return Refit(w_new, delta, explained)


def obs_select(w: torch.Tensor, m: Moments, n_keep: int, *, ridge: float = 1e-2, centered: bool = True,
               rounds: int = 64, dtype: torch.dtype = torch.float32,
               removable: torch.Tensor | None = None) -> torch.Tensor:
    """The `n_keep` channels whose least-squares refit loses least (structured OBS, greedy backwards).

    Removing a set S of channels, with the others refitted, costs tr(W_S (H^-1_SS)^-1 W_S^T) for
    H = S + lambda I (the moments of `refit`); the single-channel cost is ||W[:, j]||^2 / H^-1_jj.
    Each round removes the cheapest ~(C - n_keep) / `rounds` channels by their single costs and
    updates W and H^-1 for the whole block, so the next round's costs include the compensation
    (the exact greedy OBS of ZipLM / SlimGPT when a round removes one channel).

    H, its factor and H^-1 are formed in `dtype` (float32: it only ranks channels; the refit itself is
    solved in float64), the updates run in place on the lower triangle of H^-1 (the rows S are read
    from it by symmetry) with removed channels masked, and the
    matrix is compacted only when a fifth of it is dead: besides the float64 Gram matrix, at most
    two C x C matrices of `dtype` are alive (8 C^2 bytes in float32). `removable` (indices): the only
    channels that may be removed; the others stay and still compensate. Sorted indices."""
    dev = m.gram.device
    c = w.shape[1]
    if not 0 <= n_keep <= c:
        raise ConfigError(f"cannot keep {n_keep} of {c} channels")
    if n_keep == c:
        return torch.arange(c, device=dev)
    fixed = torch.ones(c, dtype=torch.bool, device=dev)  # channels that must stay
    fixed[torch.arange(c, device=dev) if removable is None else removable.to(dev)] = False
    if (n_removable := c - int(fixed.sum())) < c - n_keep:
        raise ConfigError(f"{n_removable} removable channels cannot make {c - n_keep} removals")
    h = m.second(centered, dtype=dtype)
    h.diagonal().add_(_ridge(h.diagonal().double(), ridge))
    chol, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info) != 0 and dtype != torch.float64:  # too ill-conditioned for float32: factor in float64
        return obs_select(w, m, n_keep, ridge=ridge, centered=centered, rounds=rounds, dtype=torch.float64,
                          removable=removable)
    hinv = torch.cholesky_inverse(chol)
    del chol
    if not hinv.is_contiguous():  # LAPACK's result is column-major; H^-1 is symmetric, so its transpose is it
        hinv = hinv.T if hinv.T.is_contiguous() else hinv.contiguous()
    wt = w.detach().to(dev, dtype).T.contiguous()  # [C, d]: a channel's weights are a row
    idx = torch.arange(c, device=dev)  # the original channel of each row of wt and hinv
    alive = torch.ones(c, dtype=torch.bool, device=dev)
    to_remove = c - n_keep
    step = max(1, -(-to_remove // max(rounds, 1)))
    tiny = torch.finfo(dtype).tiny
    while to_remove > 0:
        cost = torch.linalg.vector_norm(wt, dim=1).square_() / hinv.diagonal().clamp_min(tiny)
        cost.masked_fill_(~alive | fixed, float("inf"))
        s = torch.topk(cost, min(step, to_remove), largest=False).indices
        rows = _symmetric_rows(hinv, s)  # H^-1_{S,:}; H^-1 is symmetric, so its columns S are rows.T
        coef = torch.linalg.solve(rows[:, s], rows)  # (H^-1_SS)^-1 H^-1_{S,:}
        wt.addmm_(coef.T, wt.index_select(0, s), alpha=-1)
        for r, end in blocks(hinv.shape[0], TRI_BLOCK):  # the update of the lower triangle only: half the work
            hinv[r:end, :end].addmm_(rows[:, r:end].T, coef[:, :end], alpha=-1)
        alive[s] = False
        to_remove -= len(s)
        if to_remove > 0 and int(alive.sum()) < 0.8 * len(alive):  # drop the dead rows and columns
            keep = alive.nonzero().flatten()
            wt, idx, fixed = wt.index_select(0, keep), idx[keep], fixed[keep]
            hinv = hinv.index_select(0, keep)
            hinv = hinv.index_select(1, keep)
            alive = torch.ones(len(keep), dtype=torch.bool, device=dev)
    if dtype != torch.float64 and not (torch.isfinite(wt).all() and torch.isfinite(hinv).all()):
        return obs_select(w, m, n_keep, ridge=ridge, centered=centered, rounds=rounds, dtype=torch.float64,
                          removable=removable)
    return idx[alive].sort().values


def _symmetric_rows(low: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rows `s` of the symmetric matrix whose lower triangle (diagonal included) `low` holds."""
    rows, cols = low.index_select(0, s), low.index_select(1, s).T
    upper = torch.arange(low.shape[0], device=low.device)[None, :] > s[:, None]
    return torch.where(upper, cols, rows)


def _quadratic(diff: torch.Tensor, m: Moments, cols: torch.Tensor | None, dtype: torch.dtype) -> float:
    """tr(D G D^T) for D = `diff` on the columns `cols` (None: all), from the blocks of G on and below its
    diagonal (G is symmetric: each block below counts twice), a block of rows at a time."""
    dev = m.gram.device
    n = diff.shape[1]
    rows = None if cols is None else cols.to(dev)
    err = 0.0
    for r, end in blocks(n, TRI_BLOCK):
        g = m.gram[r:end, :end] if rows is None else m.gram.index_select(0, rows[r:end]).index_select(1, rows[:end])
        prod = diff[:, r:end] @ g.to(dtype)  # D_a G_{a, <=a}
        del g
        err += 2 * float((prod[:, :r] * diff[:, :r]).sum(dtype=torch.float64))
        err += float((prod[:, r:] * diff[:, r:end]).sum(dtype=torch.float64))
        del prod
    return err


def _bias_terms(diff: torch.Tensor, total: torch.Tensor, bias_delta: torch.Tensor, count: int) -> float:
    """What a constant output change delta adds to the squared error: -2 delta . (D sum z) + N |delta|^2."""
    b = bias_delta.to(diff.device, torch.float64)
    return -2 * float(b @ (diff @ total.to(diff.dtype)).double()) + count * float(b @ b)


def output_error(w: torch.Tensor, kept: torch.Tensor, m: Moments, w_new: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> float:
    """sum_t || W z_t - W' z_{K,t} - delta ||^2 over the calibration tokens, from the moments alone.

    `w_new` None: the plain cut W[:, K], whose error needs only the removed block of the Gram matrix.
    `dtype` float32 halves the cost of the d x C^2 product (a reported figure, not a decision); the
    Gram matrix is read in blocks of rows, so no C x C temporary is made."""
    return cut_errors(w, kept, m, bias_delta, dtype=dtype)[1 if bias_delta is not None else 0] if w_new is None \
        else _refit_error(w, kept, m, w_new, bias_delta, dtype)


def _refit_error(w, kept, m: Moments, w_new, bias_delta, dtype) -> float:
    dev = m.gram.device
    diff = w.detach().to(dev, dtype, copy=True)
    diff[:, kept.to(dev, torch.long)] -= w_new.to(dev, dtype)
    err = _quadratic(diff, m, None, dtype)
    if bias_delta is not None:
        err += _bias_terms(diff, m.total, bias_delta, m.count)
    return max(err, 0.0)


def cut_errors(w: torch.Tensor, kept: torch.Tensor, m: Moments, bias_delta: torch.Tensor | None = None, *,
               dtype: torch.dtype = torch.float64) -> tuple[float, float | None]:
    """The plain cut's error and, with `bias_delta` (FLAP's compensation), the compensated cut's, from one
    product over the removed block of the Gram matrix."""
    dev = m.gram.device
    cols = _complement(kept.to(dev, torch.long), w.shape[1]).to(dev)
    diff = w.detach().to(dev)[:, cols].to(dtype)
    plain = _quadratic(diff, m, cols, dtype)
    if bias_delta is None:
        return max(plain, 0.0), None
    return max(plain, 0.0), max(plain + _bias_terms(diff, m.total[cols], bias_delta, m.count), 0.0)

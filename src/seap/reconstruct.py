"""Training-free reconstruction (DESIGN 2.8): refit the kept columns of each output linear.

After a plan has chosen the FFN channels K of a layer (and the head channels of its attention
output), the output linear y = W z + b is replaced by W' z_K + b' with

    W' = W[:, K] + W[:, R] S_RK (S_KK + lambda I)^-1,     b' = b + W mu - W' mu_K,

the least-squares fit of the dense layer's output on the calibration tokens (S the covariance of
z, mu its mean, lambda a ridge term relative to the mean of diag S_KK). Without a bias (`centered`
False, for runtimes whose architectures have no FFN bias: Gemma 3 in llama.cpp, vLLM), S is the
raw second moment and b' = b. FLAP's bias compensation is the special case W' = W[:, K].

The Gram matrix of a layer (d_ff^2 float64: 19 MB for SmolLM2, 1.6 GB for an 8B model) is built on
the compute device during one layer-by-layer pass over the calibration corpus and dropped once
that layer's fit is solved, so one is in memory at a time, whether the model is loaded whole or
streamed from its shards. In the sequential mode each layer sees the hidden states that the
already pruned and refitted layers before it produce (as SparseGPT), so later layers correct
what earlier ones lost.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .config import PruneConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

from .config import RECONSTRUCT_MODES as MODES


# -- the maths (pure functions) ----------------------------------------------------------------------
@dataclass
class Moments:
    """First and second moments of a layer's channels z over N tokens (float64)."""

    count: int
    total: torch.Tensor  # [C] sum of z
    gram: torch.Tensor  # [C, C] sum of z z^T

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def second(self, centered: bool) -> torch.Tensor:
        """Covariance (centered) or raw second moment, per token."""
        n = max(self.count, 1)
        m = self.gram / n
        if centered:
            mu = self.mean
            m = m - torch.outer(mu, mu)
        return m


@dataclass
class Refit:
    weight: torch.Tensor  # [d, |K|] float64
    bias_delta: torch.Tensor | None  # [d] float64, added to the linear's bias (None: no bias)


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()


def refit(w: torch.Tensor, kept: torch.Tensor, m: Moments, *, ridge: float = 1e-2, centered: bool = True) -> Refit:
    """The least-squares output weights over the kept channels (and the bias change when `centered`).

    `w`: [d, C] dense output weight; `kept`: channel indices; `ridge`: lambda relative to the mean of
    diag S_KK (0: the plain least-squares fit, which needs S_KK non-singular)."""
    if ridge < 0:
        raise ConfigError(f"the ridge term must be >= 0, got {ridge}")
    dev = m.gram.device
    w = w.detach().to(dev, torch.float64)
    kept = kept.to(dev, torch.long)
    removed = _complement(kept, w.shape[1]).to(dev)
    s = m.second(centered)
    w_k = w[:, kept]
    if len(removed) and len(kept):
        s_kk = s[kept][:, kept]
        lam = ridge * float(s_kk.diagonal().mean()) if ridge > 0 else 0.0
        # A tiny floor keeps the Cholesky factor defined for channels that never fired.
        lam = max(lam, 1e-12 * float(s_kk.diagonal().abs().max().clamp_min(1e-30)))
        a = s_kk + lam * torch.eye(len(kept), dtype=s.dtype, device=dev)
        chol, info = torch.linalg.cholesky_ex(a)
        rhs = s[kept][:, removed] @ w[:, removed].T  # [|K|, d] = S_KR W_R^T
        if int(info) == 0:
            w_new = w_k + torch.cholesky_solve(rhs, chol).T
        else:  # not positive definite even with the ridge: a least-squares solve still gives the fit
            w_new = w_k + torch.linalg.lstsq(a, rhs).solution.T
    else:
        w_new = w_k.clone()
    delta = (w @ m.mean.to(dev) - w_new @ m.mean.to(dev)[kept]) if centered else None
    return Refit(w_new, delta)


def output_error(w: torch.Tensor, kept: torch.Tensor, m: Moments, w_new: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None) -> float:
    """sum_t || W z_t - W' z_{K,t} - delta ||^2 over the calibration tokens, from the moments alone.

    `w_new` None: the plain cut W[:, K]."""
    dev = m.gram.device
    w = w.detach().to(dev, torch.float64)
    kept = kept.to(dev, torch.long)
    diff = w.clone()
    diff[:, kept] -= w[:, kept] if w_new is None else w_new.to(dev, torch.float64)
    err = float(torch.einsum("ij,jk,ik->", diff, m.gram, diff))
    if bias_delta is not None:
        b = bias_delta.to(dev, torch.float64)
        err += -2 * float(b @ (diff @ m.total)) + m.count * float(b @ b)
    return max(err, 0.0)


# -- accumulating the moments on the device --------------------------------------------------------
class GramAccumulator:
    """Sum, count and Gram matrix of one linear's inputs, on its device: float32 per batch, float64
    running values, no host sync; padding excluded with `where`."""

    def __init__(self, channels: int, device: torch.device):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if keep is not None:
            keep = keep.reshape(-1, 1).to(x.device)
            x = torch.where(keep, x, 0.0)
            self.count += keep.sum(dtype=torch.float64)
        else:
            self.count += x.shape[0]
        self.total += x.sum(0).double()
        self.gram += (x.T @ x).double()

    def result(self) -> Moments:
        return Moments(int(round(float(self.count.item()))), self.total, self.gram)


@contextmanager
def recording(linears: dict[str, nn.Linear], state: dict) -> Iterator[dict[str, GramAccumulator]]:
    """Gram accumulators on the inputs of `linears`; `state["mask"]` ([B, S] bool) marks real tokens."""
    acc = {k: GramAccumulator(lin.in_features, lin.weight.device) for k, lin in linears.items()}
    handles = []

    def hook(a: GramAccumulator):
        def fn(_m, args):
            a.add(args[0], state.get("mask"))
        return fn

    try:
        for k, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(hook(acc[k])))
        yield acc
    finally:
        for h in handles:
            h.remove()


# -- the pass --------------------------------------------------------------------------------------------
@dataclass
class RefitConfig:
    mode: str = "refit"
    ridge: float = 1e-2
    centered: bool = True  # fit a bias too (needs an FFN output bias in the pruned architecture)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown reconstruction {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.ridge < 0:
            raise ConfigError(f"the ridge term must be >= 0, got {self.ridge}")

    @classmethod
    def of(cls, cfg: PruneConfig, adapter: Adapter, config) -> RefitConfig:
        """The pruning config's reconstruction for a model (`config`: its transformers config)."""
        bias = cfg.refit_bias if cfg.refit_bias is not None else adapter.supports_native_ffn_out_bias(config)
        return cls(cfg.reconstruct, cfg.ridge, bias)


def _head_channels(adapter: Adapter, layer: nn.Module, heads: torch.Tensor, head_unit: str | None) -> torch.Tensor:
    from .surgery import head_index_sets

    return head_index_sets(adapter, layer, heads, head_unit)[0]


@torch.no_grad()
def refit_expert(runner, ex, head_unit: str | None, cfg: RefitConfig, *, store_dtype: torch.dtype,
                 progress: bool = True, desc: str = "reconstruction") -> None:
    """Fill the expert's refitted output weights (ffn_out, attn_out) and bias changes, layer by layer.

    `runner`: a seap.layerwise.LayerRunner over the expert's calibration corpus."""
    from .plan import bias_compensation
    from .surgery import layer_masked

    adapter = runner.adapter
    n = runner.n_layers
    ex.ffn_out = [None] * n
    ex.ffn_bias = [None] * n if cfg.centered else None
    heads = ex.heads is not None
    ex.attn_out = [None] * n if heads else None
    ex.attn_bias = [None] * n if heads and cfg.centered else None
    errors = {"none": [], "bias": [], "refit": []}
    for i, layer in tqdm(runner.layers(), total=n, desc=desc, unit="layer", disable=not progress, leave=False):
        linears = {"ffn": adapter.ffn_out(layer)}
        kept = {"ffn": ex.ffn[i]}
        if heads:
            linears["attn"] = adapter.attn_out(layer)
            kept["attn"] = _head_channels(adapter, layer, ex.heads[i], head_unit)
        with recording(linears, runner.state) as acc:
            outputs = runner.run(i, layer)
        for kind, lin in linears.items():
            m = acc[kind].result()
            fit = refit(lin.weight, kept[kind], m, ridge=cfg.ridge, centered=cfg.centered)
            getattr(ex, f"{kind}_out")[i] = fit.weight.to("cpu", store_dtype)
            if cfg.centered:
                getattr(ex, f"{kind}_bias")[i] = fit.bias_delta.to("cpu", torch.float32)
            if kind == "ffn":
                errors["none"].append(output_error(lin.weight, kept[kind], m))
                flap = bias_compensation(lin.weight, m, kept[kind])  # FLAP's bias, for comparison
                errors["bias"].append(output_error(lin.weight, kept[kind], m, None, flap))
                errors["refit"].append(output_error(lin.weight, kept[kind], m, fit.weight, fit.bias_delta))
            del m, acc[kind]
        if cfg.mode == "sequential":  # the next layer sees this layer pruned and refitted
            with layer_masked(layer, adapter, ex, i, head_unit):
                outputs = runner.run(i, layer)
        runner.advance(outputs)
    ex.stats["reconstruction"] = {
        "mode": cfg.mode, "ridge": cfg.ridge, "centered": cfg.centered, "tokens": runner.n_tokens,
        # squared FFN output error on the calibration tokens, per layer: plain cut, FLAP's bias, refit
        "ffn_error": {k: [float(f"{e:.6g}") for e in v] for k, v in errors.items()},
    }


def error_summary(ex) -> dict | None:
    """Model-wide relative error of the refit against the plain cut and FLAP's bias (for reports)."""
    rec = ex.stats.get("reconstruction")
    if not rec:
        return None
    e = rec["ffn_error"]
    base = sum(e["none"]) or 1.0
    return {"bias / cut": sum(e["bias"]) / base, "refit / cut": sum(e["refit"]) / base}



def reconstruct_plan(lm, plan, corpora: dict[str, Sequence[str]], cfg: RefitConfig, *, batch_size: int = 8,
                     max_length: int = 512, progress: bool = True) -> None:
    """Refit the output linears of the plan's experts named in `corpora`, each on its own corpus
    (the texts its channels were chosen from), one decoder layer in memory at a time for a model
    streamed from its checkpoint (seap.models.LazyModel) as for one loaded whole."""
    from .layerwise import LayerRunner, SkeletonLoader, empty_model
    from .models import LazyModel
    from .stats import batches, position_limit

    limit = position_limit(lm.model.config, max_length)
    for name, texts in corpora.items():
        _, ex = plan.expert(name)
        enc = batches(lm.tokenizer, texts, batch_size, limit)
        if isinstance(lm, LazyModel):
            skeleton = empty_model(lm.model.config, lm.dtype)
            runner = LayerRunner(skeleton, lm.adapter, enc, device=lm.device, dtype=lm.dtype,
                                 loader=SkeletonLoader(skeleton, lm.adapter, lm.checkpoint))
        else:
            lm.model.eval()
            runner = LayerRunner(lm.model, lm.adapter, enc, device=lm.adapter.embeddings(lm.model).weight.device)
        refit_expert(runner, ex, plan.head_unit, cfg, store_dtype=lm.save_dtype, progress=progress,
                     desc=f"reconstruction ({name})")
        summary = error_summary(ex)
        log.info("reconstructed expert %s on %d tokens: FFN output error %.3f of the plain cut (FLAP's bias: %.3f)",
                 name, runner.n_tokens, summary["refit / cut"], summary["bias / cut"])

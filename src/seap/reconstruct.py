"""Training-free reconstruction (docs/design.md §2.8): refit the kept columns of each output linear.

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
from .runtime import available_memory

log = logging.getLogger(__name__)

from .config import REFIT_CHOICES as CHOICES
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


def obs_select(w: torch.Tensor, m: Moments, n_keep: int, *, ridge: float = 1e-2, centered: bool = True,
               rounds: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `n_keep` channels whose least-squares refit loses least (structured OBS, greedy backwards).

    Removing a set S of channels, with the others refitted, costs tr(W_S (H^-1_SS)^-1 W_S^T) for
    H = S + lambda I (the moments of `refit`); the single-channel cost is ||W[:, j]||^2 / H^-1_jj.
    Each round removes the cheapest ~(C - n_keep) / `rounds` channels by their single costs and
    updates W and H^-1 for the whole block, so the next round's costs include the compensation
    (the exact greedy OBS of ZipLM / SlimGPT when a round removes one channel). H^-1 is formed in
    float64; the updates run in `dtype` (float32: half the memory traffic; it only ranks channels,
    the refit itself is solved in float64) on a matrix that shrinks as channels go. Sorted indices."""
    dev = m.gram.device
    c = w.shape[1]
    if not 0 <= n_keep <= c:
        raise ConfigError(f"cannot keep {n_keep} of {c} channels")
    h = m.second(centered).clone()
    lam = ridge * float(h.diagonal().mean()) if ridge > 0 else 0.0
    lam = max(lam, 1e-12 * float(h.diagonal().abs().max().clamp_min(1e-30)))
    h.diagonal().add_(lam)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h)).to(dtype)
    w0, w = w, w.detach().to(dev, dtype).clone()
    idx = torch.arange(c, device=dev)  # the original channel of each remaining column
    to_remove = c - n_keep
    step = max(1, -(-to_remove // max(rounds, 1)))
    tiny = torch.finfo(dtype).tiny
    while to_remove > 0:
        cost = (w * w).sum(0) / hinv.diagonal().clamp_min(tiny)
        s = torch.topk(cost, min(step, to_remove), largest=False).indices
        coef = torch.linalg.solve(hinv[s][:, s], hinv[s])  # (H^-1_SS)^-1 H^-1_{S,:}
        w -= w[:, s] @ coef
        hinv -= hinv[:, s] @ coef
        alive = torch.ones(len(idx), dtype=torch.bool, device=dev)
        alive[s] = False
        w, hinv, idx = w[:, alive], hinv[alive][:, alive], idx[alive]
        to_remove -= len(s)
    if dtype != torch.float64 and not (torch.isfinite(w).all() and torch.isfinite(hinv).all()):
        return obs_select(w0, m, n_keep, ridge=ridge, centered=centered, rounds=rounds, dtype=torch.float64)
    return idx.sort().values


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
def recording(linears: dict[str, nn.Linear], state: dict,
              labels: Sequence[str] | None = None) -> Iterator[dict[str | None, dict[str, GramAccumulator]]]:
    """Gram accumulators on the inputs of `linears`, one set per label: `labels` names the corpus of each
    of the runner's batches (`state["batch"]`), None gives one set under None. `state["mask"]`
    ([B, S] bool) marks real tokens."""
    keys = sorted(set(labels)) if labels is not None else [None]
    acc = {key: {k: GramAccumulator(lin.in_features, lin.weight.device) for k, lin in linears.items()}
           for key in keys}
    handles = []

    def hook(kind: str):
        def fn(_m, args):
            key = None if labels is None else labels[state["batch"]]
            acc[key][kind].add(args[0], state.get("mask"))
        return fn

    try:
        for k, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(hook(k)))
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
    choice: str = "score"  # "obs": choose each layer's FFN channels (same width) for the refit

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ConfigError(f"unknown channel choice {self.choice!r}: choose one of {', '.join(CHOICES)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown reconstruction {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.ridge < 0:
            raise ConfigError(f"the ridge term must be >= 0, got {self.ridge}")

    @classmethod
    def of(cls, cfg: PruneConfig, adapter: Adapter, config) -> RefitConfig:
        """The pruning config's reconstruction for a model (`config`: its transformers config)."""
        bias = cfg.refit_bias if cfg.refit_bias is not None else adapter.supports_native_ffn_out_bias(config)
        return cls(cfg.reconstruct, cfg.ridge, bias, cfg.refit_choice)


def _head_channels(adapter: Adapter, layer: nn.Module, heads: torch.Tensor, head_unit: str | None) -> torch.Tensor:
    from .surgery import head_index_sets

    return head_index_sets(adapter, layer, heads, head_unit)[0]


class _ExpertRefit:
    """One expert's refit, filled layer by layer from the moments of its output linears' inputs."""

    def __init__(self, ex, n_layers: int, head_unit: str | None, cfg: RefitConfig, store_dtype: torch.dtype):
        self.ex, self.head_unit, self.cfg, self.store_dtype = ex, head_unit, cfg, store_dtype
        ex.ffn_out = [None] * n_layers
        ex.ffn_bias = [None] * n_layers if cfg.centered else None
        heads = ex.heads is not None
        ex.attn_out = [None] * n_layers if heads else None
        ex.attn_bias = [None] * n_layers if heads and cfg.centered else None
        self.errors: dict[str, list[float]] = {"none": [], "bias": [], "refit": []}

    def linears(self, adapter: Adapter, layer: nn.Module) -> dict[str, nn.Linear]:
        out = {"ffn": adapter.ffn_out(layer)}
        if self.ex.heads is not None:
            out["attn"] = adapter.attn_out(layer)
        return out

    def layer(self, adapter: Adapter, i: int, layer: nn.Module, moments: dict[str, Moments]) -> None:
        from .plan import bias_compensation

        ex, cfg = self.ex, self.cfg
        for kind, lin in self.linears(adapter, layer).items():
            m = moments[kind]
            scored = ex.ffn[i] if kind == "ffn" else _head_channels(adapter, layer, ex.heads[i], self.head_unit)
            kept = scored
            if kind == "ffn" and cfg.choice == "obs":
                kept = ex.ffn[i] = obs_select(lin.weight, m, len(scored), ridge=cfg.ridge, centered=cfg.centered
                                              ).to(scored.device, scored.dtype)
            fit = refit(lin.weight, kept, m, ridge=cfg.ridge, centered=cfg.centered)
            getattr(ex, f"{kind}_out")[i] = fit.weight.to("cpu", self.store_dtype)
            if cfg.centered:
                getattr(ex, f"{kind}_bias")[i] = fit.bias_delta.to("cpu", torch.float32)
            if kind == "ffn":
                self.errors["none"].append(output_error(lin.weight, scored, m))
                flap = bias_compensation(lin.weight, m, scored)  # FLAP's bias, for comparison
                self.errors["bias"].append(output_error(lin.weight, scored, m, None, flap))
                self.errors["refit"].append(output_error(lin.weight, kept, m, fit.weight, fit.bias_delta))

    def finish(self, tokens: int) -> None:
        cfg = self.cfg
        self.ex.stats["reconstruction"] = {
            "mode": cfg.mode, "ridge": cfg.ridge, "centered": cfg.centered, "choice": cfg.choice, "tokens": tokens,
            # squared FFN output error on the calibration tokens, per layer: plain cut and FLAP's bias of
            # the score's channels, refit of the channels kept (the OBS choice with "obs")
            "ffn_error": {k: [float(f"{e:.6g}") for e in v] for k, v in self.errors.items()},
        }


@torch.no_grad()
def refit_expert(runner, ex, head_unit: str | None, cfg: RefitConfig, *, store_dtype: torch.dtype,
                 progress: bool = True, desc: str = "reconstruction") -> None:
    """Fill the expert's refitted output weights (ffn_out, attn_out) and bias changes, layer by layer.

    `runner`: a seap.layerwise.LayerRunner over the expert's calibration corpus."""
    from .surgery import layer_masked

    adapter = runner.adapter
    job = _ExpertRefit(ex, runner.n_layers, head_unit, cfg, store_dtype)
    for i, layer in tqdm(runner.layers(), total=runner.n_layers, desc=desc, unit="layer", disable=not progress,
                         leave=False):
        with recording(job.linears(adapter, layer), runner.state) as acc:
            outputs = runner.run(i, layer)
        job.layer(adapter, i, layer, {k: a.result() for k, a in acc[None].items()})
        del acc
        if cfg.mode == "sequential":  # the next layer sees this layer pruned and refitted
            with layer_masked(layer, adapter, ex, i, head_unit):
                outputs = runner.run(i, layer)
        runner.advance(outputs)
    job.finish(runner.n_tokens)


@torch.no_grad()
def refit_experts_shared(runner, experts: dict, members: dict[str, Sequence[str]], batch_corpus: list[str],
                         head_unit: str | None, cfg: RefitConfig, *, store_dtype: torch.dtype,
                         progress: bool = True) -> None:
    """Refit several experts in one pass over the dense model (mode "refit"): the moments of each
    corpus are kept apart (`batch_corpus`: the corpus of each of the runner's batches) and an expert's
    are the sum over its corpora (`members`), so a plan's task experts and its generic expert cost
    one pass over their texts instead of one pass each."""
    if cfg.mode != "refit":
        raise ConfigError("only the refit mode shares one pass between experts (sequential: one pass each)")
    adapter = runner.adapter
    jobs = {name: _ExpertRefit(ex, runner.n_layers, head_unit, cfg, store_dtype) for name, ex in experts.items()}
    heads = any(ex.heads is not None for ex in experts.values())
    for i, layer in tqdm(runner.layers(), total=runner.n_layers, desc="reconstruction", unit="layer",
                         disable=not progress, leave=False):
        linears = {"ffn": adapter.ffn_out(layer), **({"attn": adapter.attn_out(layer)} if heads else {})}
        with recording(linears, runner.state, batch_corpus) as acc:
            outputs = runner.run(i, layer)
        per_corpus = {c: {k: a.result() for k, a in kinds.items()} for c, kinds in acc.items()}
        del acc
        for name, job in jobs.items():
            job.layer(adapter, i, layer, {k: _sum([per_corpus[c][k] for c in members[name]])
                                          for k in job.linears(adapter, layer)})
        runner.advance(outputs)
    for name, job in jobs.items():  # tokens: every layer counts the same real tokens
        job.finish(sum(per_corpus[c]["ffn"].count for c in members[name]))


def _sum(moments: list[Moments]) -> Moments:
    return Moments(sum(m.count for m in moments), sum(m.total for m in moments), sum(m.gram for m in moments))


def error_summary(ex) -> dict | None:
    """Model-wide relative error of the refit against the plain cut and FLAP's bias (for reports)."""
    rec = ex.stats.get("reconstruction")
    if not rec:
        return None
    e = rec["ffn_error"]
    base = sum(e["none"]) or 1.0
    return {"bias / cut": sum(e["bias"]) / base, "refit / cut": sum(e["refit"]) / base}



def reconstruct_plan(lm, plan, corpora: dict[str, Sequence[str]], cfg: RefitConfig, *,
                     members: dict[str, Sequence[str]] | None = None, batch_size: int = 8, max_length: int = 512,
                     progress: bool = True) -> None:
    """Refit the output linears of the plan's experts on the texts their channels were chosen from,
    one decoder layer in memory at a time for a model streamed from its checkpoint
    (seap.models.LazyModel) as for one loaded whole.

    `corpora`: name -> texts; `members`: expert -> the corpora it was calibrated on (default: each
    corpus is the expert of that name). In the refit mode the experts share one pass when the
    per-corpus Gram matrices of a layer fit in a quarter of the free memory; otherwise, and in the
    sequential mode (each expert its own pruned stream), one pass per expert."""
    from .layerwise import LayerRunner
    from .skeleton import SkeletonLoader, empty_model
    from .models import LazyModel
    from .stats import batches, position_limit

    members = members or {name: (name,) for name in corpora}
    missing = sorted({c for cs in members.values() for c in cs} - set(corpora))
    if missing:
        raise ConfigError(f"no calibration texts for corpora {', '.join(missing)}")
    limit = position_limit(lm.model.config, max_length)
    lazy = isinstance(lm, LazyModel)
    device = lm.device if lazy else lm.adapter.embeddings(lm.model).weight.device

    def runner_over(texts_by_corpus: dict[str, Sequence[str]]) -> tuple[LayerRunner, list[str]]:
        enc, labels = [], []
        for c, texts in texts_by_corpus.items():
            part = batches(lm.tokenizer, texts, batch_size, limit)
            enc += part
            labels += [c] * len(part)
        if lazy:
            skeleton = empty_model(lm.model.config, lm.dtype)
            return LayerRunner(skeleton, lm.adapter, enc, device=lm.device, dtype=lm.dtype,
                               loader=SkeletonLoader(skeleton, lm.adapter, lm.checkpoint)), labels
        lm.model.eval()
        return LayerRunner(lm.model, lm.adapter, enc, device=device), labels

    used = sorted({c for cs in members.values() for c in cs})
    widths = [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(lm.model)]
    gram_bytes = len(used) * max(widths) ** 2 * 8 * (2 if plan.head_unit else 1)
    if cfg.mode == "refit" and len(members) > 1 and gram_bytes <= available_memory(device) // 4:
        runner, labels = runner_over({c: corpora[c] for c in used})
        refit_experts_shared(runner, {n: plan.expert(n)[1] for n in members}, members, labels, plan.head_unit, cfg,
                             store_dtype=lm.save_dtype, progress=progress)
    else:
        for name, cs in members.items():
            runner, _ = runner_over({c: corpora[c] for c in cs})
            refit_expert(runner, plan.expert(name)[1], plan.head_unit, cfg, store_dtype=lm.save_dtype,
                         progress=progress, desc=f"reconstruction ({name})")
    for name in members:
        summary = error_summary(plan.expert(name)[1])
        log.info("reconstructed expert %s on %d tokens: FFN output error %.3f of the plain cut (FLAP's bias: %.3f)",
                 name, plan.expert(name)[1].stats["reconstruction"]["tokens"], summary["refit / cut"],
                 summary["bias / cut"])

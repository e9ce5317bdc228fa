"""GRIFFIN (docs/design.md §2.6): per-prompt FFN experts chosen from the prompt's own activations.

Prefill runs the full FFN. For each sequence, with Z [S, d_ff] the down-projection inputs of
its real tokens, each token's row is normalised to unit L2 norm and neuron j scores the L2 norm
of its column; the top k = round(density * d_ff) neurons of each layer are that sequence's
expert, and decoding runs through them only.

Batches: every sequence keeps its own expert. The weights read at a decode step are those of the
union U of the batch's experts (gathered once per batch), and each sequence's activations
outside its own expert are zeroed, so a row computes exactly what it computes alone while the
batch shares one matrix product. A step reads |U| neurons, and diverse prompts make U large
(about 90% of the FFN for 8 news articles at density 0.5), which caps the batch speed-up; on
memory-bound decode, per-sequence weight copies (one bmm per layer) read B * k neurons, more
still. `shared=True` trades exactness for speed: one expert of k neurons for the whole batch,
the top k of the pooled statistic (each sequence's scores scaled to unit norm, so that every
prompt counts alike), and a step reads only k neurons.

A model already sliced by a plan composes naturally: the selection is made within its kept
neurons (k counts the sliced width).

Generation runs seap.inference.decoding.greedy with a GriffinSelection: its prefill() collects the statistic
around the dense prefill forward, its decode() swaps in the gathered linears for the decode steps.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.scores import neuron_scores, ranking, top_k
from ..errors import ConfigError
from ..model.adapters import Adapter
from ..model.adapters.base import by_sequence, module_path, set_module
from ..model.hooks import hooked

log = logging.getLogger(__name__)

MODES = ("gen", "class")
SHORT_MODES = ("prior", "density", "none")
DEFAULT_SHORT = "density"  # measured best on short prompts (benchmarks/RESULTS.md, "Short prompts")


@dataclass(frozen=True)
class GriffinConfig:
    density: float = 0.5  # share of each layer's FFN neurons kept per prompt
    mode: str = "gen"  # "gen": select at prefill, prune decoding; "class": prune the last token only
    shared: bool = False  # one expert per batch (pooled statistic) instead of one per sequence
    # Short prompts are little evidence. "density" (default): keep d + (1 - d) * n0 / (n + n0) of the
    # neurons for an n-token prompt; "prior": the prompt's statistic plus a generic one worth n0 prompt
    # tokens, at the same density; "none": the paper's pure statistic.
    short: str = DEFAULT_SHORT
    prior_tokens: float = 64.0  # n0

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"GRIFFIN density must be in (0, 1] (the share of FFN neurons kept), got {self.density}")
        if self.mode not in MODES:
            raise ConfigError(f"GRIFFIN mode must be one of {MODES}, got {self.mode!r}")
        if self.shared and self.mode == "class":
            raise ConfigError("shared batch experts apply to generation; classification mode selects per sequence")
        if self.short not in SHORT_MODES:
            raise ConfigError(f"GRIFFIN short-prompt mode must be one of {', '.join(SHORT_MODES)}, got {self.short!r}")
        if self.prior_tokens < 0:
            raise ConfigError(f"GRIFFIN prior tokens must be >= 0, got {self.prior_tokens}")


    @property
    def pure(self) -> bool:
        return self.short == "none" or self.prior_tokens == 0

    @property
    def label(self) -> str:
        """How reports and benchmark rows name this setting, e.g. griffin@0.5, griffin@0.5-shared,
        griffin@0.5+prior64 (the short-prompt fix and its n0)."""
        fix = "" if self.pure or self.mode == "class" else f"+{self.short}{self.prior_tokens:g}"
        return f"griffin@{self.density:g}{'-shared' if self.shared else ''}{fix}"

    def densities(self, counts: torch.Tensor) -> torch.Tensor:
        """[B] density per sequence of `counts` real tokens (raised for short prompts in 'density' mode)."""
        d = torch.full(counts.shape, self.density, dtype=torch.float64)
        if self.short == "density" and not self.pure:
            n0 = self.prior_tokens
            d = d + (1 - d) * n0 / (counts.double().cpu() + n0)
        return d


# -- the selection (pure) ---------------------------------------------------------------------
def keep_count(density: float, width: int) -> int:
    return max(1, min(width, round(density * width)))


@dataclass
class Selection:
    """Per layer: the batch's union of kept neurons and each sequence's membership in it."""

    union: list[torch.Tensor]  # [|U_l|] ascending
    member: list[torch.Tensor | None]  # [B, |U_l|] bool; None when every sequence keeps all of U_l
    widths: list[int]  # the dense widths the selection was made in
    kept: list[int] = field(default_factory=list)  # k per layer

    @property
    def union_fraction(self) -> float:
        return sum(len(u) for u in self.union) / sum(self.widths)


def pooled_scores(scores: torch.Tensor) -> torch.Tensor:
    """[B, F] per-sequence scores -> [1, F]: the root sum of squares of each row scaled to unit
    L2 norm, so a long or loud prompt does not outvote the others."""
    unit = scores / scores.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return unit.square().sum(0, keepdim=True).sqrt()


def with_prior(scores: torch.Tensor, prior: torch.Tensor, tokens: float) -> torch.Tensor:
    """[B, F] prompt scores combined with a generic statistic: sqrt(s^2 + n0 * p). A prompt's squared
    scores sum to its token count n, and p sums to 1, so the prior weighs as n0 tokens would."""
    return (scores.float().square() + tokens * prior.to(scores.device, torch.float32)[None]).sqrt()


def select(scores: Sequence[torch.Tensor], density: float | torch.Tensor, shared: bool = False) -> Selection:
    """Each layer's top k per sequence (or, `shared`, one top k of the pooled scores for all).
    `density`: one for all, or [B] per sequence (GriffinConfig.densities)."""
    union, member, widths, kept = [], [], [], []
    for s in scores:
        width = s.shape[-1]
        ds = density.tolist() if isinstance(density, torch.Tensor) else [density] * s.shape[0]
        ks = [keep_count(d, width) for d in ds]
        if shared:  # one set for the batch, as large as its largest member's
            s, ks = pooled_scores(s), [max(ks)]
        if len(set(ks)) == 1:
            idx = top_k(s, ks[0])  # [B, k] (or [1, k] shared by all rows)
            m = torch.zeros(idx.shape[0], width, dtype=torch.bool, device=s.device).scatter_(1, idx, True)
        else:  # the k_b best of each row
            order = ranking(s)[:, :max(ks)]
            first = torch.arange(order.shape[1], device=s.device)[None] < torch.tensor(ks, device=s.device)[:, None]
            m = torch.zeros(s.shape[0], width, dtype=torch.bool, device=s.device).scatter_(1, order, first)
        u = torch.nonzero(m.any(0)).flatten()
        m = m[:, u]
        union.append(u)
        member.append(None if bool(m.all()) else m)
        widths.append(width)
        kept.append(sum(ks) / len(ks))
    return Selection(union, member, widths, kept)


# -- hooks and replacements ---------------------------------------------------------------------
def _batch(attention_mask: torch.Tensor | None) -> int | None:
    return None if attention_mask is None else attention_mask.shape[0]


@contextmanager
def prefill_statistics(model: nn.Module, adapter: Adapter,
                       attention_mask: torch.Tensor | None) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's [B, d_ff] neuron scores during one forward; hooks removed on exit."""
    scores: list[torch.Tensor | None] = [None] * len(adapter.layers(model))

    def hook(i: int):
        def fn(_m, args):
            scores[i] = neuron_scores(by_sequence(args[0], _batch(attention_mask)), attention_mask)
        return fn

    with hooked((adapter.ffn_out(layer), "pre", hook(i)) for i, layer in enumerate(adapter.layers(model))):
        yield scores  # type: ignore[misc]


class _GatheredIn(nn.Module):
    def __init__(self, base: nn.Linear, union: torch.Tensor):
        super().__init__()
        self.weight = base.weight.index_select(0, union)
        self.bias = None if base.bias is None else base.bias.index_select(0, union)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _GatheredOut(nn.Module):
    def __init__(self, base: nn.Linear, union: torch.Tensor, member: torch.Tensor | None, batch: int):
        super().__init__()
        self.weight = base.weight.index_select(1, union)
        self.bias, self.batch = base.bias, batch
        self.member = None if member is None else member[:, None, :]  # [B, 1, |U|]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.member is not None:
            shape = z.shape
            z = (z.reshape(self.batch, -1, shape[-1]) * self.member.to(z.dtype)).reshape(shape)
        return F.linear(z, self.weight, self.bias)


@contextmanager
def experts_applied(model: nn.Module, adapter: Adapter, selection: Selection, batch: int) -> Iterator[nn.Module]:
    """The model decoding through each sequence's selected neurons; the dense linears come back on exit."""
    swaps = []
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            u = selection.union[i]
            if len(u) == selection.widths[i] and selection.member[i] is None:
                continue  # density 1.0 in this layer: the dense linears are the expert
            for lin in adapter.ffn_in(layer):
                swaps.append((module_path(model, lin), lin, _GatheredIn(lin, u)))
            out = adapter.ffn_out(layer)
            swaps.append((module_path(model, out), out, _GatheredOut(out, u, selection.member[i], batch)))
    try:
        for path, _, new in swaps:
            set_module(model, path, new)
        yield model
    finally:
        for path, old, _ in swaps:
            set_module(model, path, old)


@contextmanager
def classification_mode(model: nn.Module, adapter: Adapter, density: float,
                        attention_mask: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """GRIFFIN's mode for log-likelihood scoring: each sequence's statistic comes from all its
    tokens but the last, and only the last token's FFN runs through the selected neurons."""

    def hook(_m, args):
        z = args[0]
        shape = z.shape
        z3 = by_sequence(z, _batch(attention_mask))
        batch = z3.shape[0]
        mask = torch.ones(z3.shape[:2], device=z.device) if attention_mask is None else attention_mask.to(z.device)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # [B] position of the last real token
        stat_mask = mask.clone()
        stat_mask[torch.arange(batch), last] = 0
        idx = top_k(neuron_scores(z3, stat_mask), keep_count(density, shape[-1]))
        keep = torch.zeros(batch, shape[-1], dtype=torch.bool, device=z.device).scatter_(1, idx, True)
        z3 = z3.clone()
        rows = torch.arange(batch)
        z3[rows, last] = z3[rows, last] * keep.to(z3.dtype)
        return (z3.reshape(shape),) + tuple(args[1:])

    with hooked((adapter.ffn_out(layer), "pre", hook) for layer in adapter.layers(model)):
        yield model


# -- generation: GRIFFIN as a selection of seap.inference.decoding.greedy -------------------------------------
class GriffinSelection:
    """GRIFFIN for `seap.inference.decoding.greedy`: the dense prefill's statistic picks each prompt's
    experts (or one for the batch, `shared`), the decode steps run through them.

    `config`: a GriffinConfig (with its short-prompt fix; 'prior' needs `prior`, per-layer shares
    from `griffin_prior`), or a density (the paper's pure statistic). One selection serves one
    decode at a time: each prefill replaces the experts (and `stats`) of the previous one."""

    def __init__(self, adapter: Adapter, config: float | GriffinConfig,
                 prior: Sequence[torch.Tensor] | None = None):
        cfg = config if isinstance(config, GriffinConfig) else GriffinConfig(density=config, short="none")
        if cfg.short == "prior" and not cfg.pure and prior is None:
            raise ConfigError("GRIFFIN's short-prompt prior needs the model's generic statistic: "
                              "pass prior=seap.inference.griffin.griffin_prior(lm), or short='none'")
        self.adapter, self.config, self.prior = adapter, cfg, prior
        self.selection: Selection | None = None
        self.batch = 0
        self.stats: dict[str, float] = {}

    @contextmanager
    def prefill(self, model: nn.Module, attention_mask: torch.Tensor) -> Iterator[None]:
        """Collect the statistic during the prefill forward, select when it is done."""
        cfg = self.config
        with prefill_statistics(model, self.adapter, attention_mask) as scores:
            yield
        if cfg.short == "prior" and not cfg.pure:
            scores = [with_prior(s, p, cfg.prior_tokens) for s, p in zip(scores, self.prior)]
        density = cfg.densities(attention_mask.sum(-1)) if cfg.short == "density" else cfg.density
        self.selection, self.batch = select(scores, density, cfg.shared), attention_mask.shape[0]
        self.stats = {"union_fraction": self.selection.union_fraction,
                      "kept_fraction": sum(self.selection.kept) / sum(self.selection.widths)}

    @contextmanager
    def decode(self, model: nn.Module) -> Iterator[None]:
        if self.selection is None:
            raise RuntimeError("GRIFFIN decodes through the experts of a prefill: enter prefill() first")
        with experts_applied(model, self.adapter, self.selection, self.batch):
            yield


def griffin_selection(lm, density: float | GriffinConfig | None, *, shared: bool = False,
                      prior: Sequence[torch.Tensor] | None = None) -> GriffinSelection | None:
    """The selection of a generation path: None (density None: the model as it is), a float (the
    paper's pure statistic; `shared`: one expert per batch) or a GriffinConfig (the prior of its
    'prior' fix computed, or read from the cache, when not given)."""
    if density is None:
        return None
    cfg = density if isinstance(density, GriffinConfig) else GriffinConfig(density=density, shared=shared,
                                                                           short="none")
    if prior is None and cfg.short == "prior" and not cfg.pure:
        prior = griffin_prior(lm)
    return GriffinSelection(lm.adapter, cfg, prior)


# -- the generic prior for short prompts ----------------------------------------------------------
PRIOR_TEXTS = 64  # embedded-corpus texts the prior is measured on (about 4k tokens)
PRIOR_FORMAT, PRIOR_VERSION = "seap-griffin-prior", 1


@torch.inference_mode()
def corpus_statistic(lm, texts: Sequence[str], batch_size: int = 8, max_length: int = 512,
                     progress: bool = False) -> list[torch.Tensor]:
    """Per layer [F]: GRIFFIN's statistic over a corpus, per token, sum_t z_tj^2 / ||z_t||^2 / N (it
    sums to 1): how a generic prompt of N tokens spreads its evidence over the neurons. One pass of the
    calibration engine (a model in memory or streamed from its checkpoint; summed across processes
    under torchrun)."""
    from ..calibration.engine import Outcome, run_pass
    from ..calibration.observers import PriorObserver
    from ..calibration.layerwise import engine_for

    engine, _ = engine_for(lm, {"prior": list(texts)}, batch_size=batch_size, max_length=max_length)
    out: list[torch.Tensor] = []

    def decide(_i, _layer, seen) -> Outcome:
        total, n = seen["prior"]
        out.append((total / max(n, 1)).float().cpu())
        return Outcome()

    run_pass(engine, [PriorObserver()], decide, desc="GRIFFIN prior", progress=progress)
    return out


def prior_cache_path(lm) -> Path:
    """Where the prior of this exact model (geometry and weights) is cached."""
    import hashlib
    import json
    import os

    from ..model.fingerprints import fingerprint

    fp = fingerprint(lm.model, lm.adapter)
    key = hashlib.sha256(json.dumps([fp["arch_hash"], fp["signature"]]).encode()).hexdigest()[:24]
    root = Path(os.environ.get("SEAP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "seap")
    return root / "griffin-priors" / f"{key}.safetensors"


def griffin_prior(lm, texts: Sequence[str] | None = None, *, cache: bool = True) -> list[torch.Tensor]:
    """The generic statistic that steadies GRIFFIN on short prompts: `corpus_statistic` of the
    embedded general corpus (or `texts`) on this model, computed once and cached per model."""
    from safetensors import safe_open

    from .._io import save_tensors

    path = prior_cache_path(lm) if cache and texts is None else None
    if path is not None and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("format") == f"{PRIOR_FORMAT}/{PRIOR_VERSION}":
                    return [fh.get_tensor(f"layer.{i}") for i in range(len(lm.adapter.layers(lm.model)))]
        except Exception as err:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.info("recomputing the GRIFFIN prior (%s)", err)
    if texts is None:
        from ..tasks import resolve_corpus

        texts = resolve_corpus("default", limit=PRIOR_TEXTS).texts
    prior = corpus_statistic(lm, texts)
    if path is not None:
        try:
            save_tensors(path, {f"layer.{i}": p.contiguous() for i, p in enumerate(prior)},
                         metadata={"format": f"{PRIOR_FORMAT}/{PRIOR_VERSION}"})
        except OSError as err:  # a read-only home: the prior still works, uncached
            log.info("could not cache the GRIFFIN prior at %s (%s)", path, err)
    return prior

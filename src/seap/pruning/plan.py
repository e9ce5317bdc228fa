"""Plans (docs/design.md §3): which FFN channels and heads each expert keeps, portable like an adapter.

A plan folder holds `plan.json` (base model, fingerprint, method, ratios, library version) and
`indices.safetensors` (kept indices and bias-compensation vectors per layer, per expert).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .._io import StoredTensor, TensorList, atomic_dir, save_tensors, stored_items
from .._version import __version__
from ..calibration.stats import ActivationStats, ChannelStats
from ..config import PruneConfig
from ..core import allocation
from ..core.allocation import ALLOCATION_NEEDS_SCORES, Pool, removed_params
from ..core.scores import channel_scores, group_scores, top_k
from ..errors import ArtifactError, ConfigError
from ..model.adapters import Adapter
from ..model.weights import LayerWeights, ModuleWeights, WeightSource
from ..outputs import prune_output_part, read_artifact

PLAN_FORMAT = "seap-plan"
PLAN_VERSION = 1
GENERIC = "generic"
LM_CORPORA = ("wikitext2", "general_text")
KINDS = ("ffn", "heads", "ffn_bias", "attn_bias", "ffn_out", "attn_out")  # per-layer tensors of an expert
REFIT_KINDS = ("ffn_out", "attn_out")  # [d, kept] per layer: the bulk of a plan, kept on disk until used


@dataclass
class Expert:
    """Kept units of one expert: FFN channel indices per layer, head (or KV-group) indices."""

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor] | None = None
    ffn_bias: list[torch.Tensor] | None = None  # [d] added to the FFN output bias per layer
    attn_bias: list[torch.Tensor] | None = None
    stats: dict = field(default_factory=dict)
    # Reconstruction (seap.core.reconstruct): refitted kept columns of the output linears, [d, kept] per layer;
    # a TensorList when they are on disk (a plan loaded, or one built from a checkpointed pass)
    ffn_out: Sequence[torch.Tensor] | None = None
    attn_out: Sequence[torch.Tensor] | None = None

    def widths(self) -> list[int]:
        return [len(i) for i in self.ffn]

    def stored_weights(self) -> dict[str, TensorList]:
        """The refitted weights held as TensorLists (each layer's in memory or on disk), by kind."""
        return {k: w for k in REFIT_KINDS if isinstance(w := getattr(self, k), TensorList)}

    def digest(self) -> str:
        """A short hash of what the expert keeps and adds: tells two experts of one name apart."""
        h = hashlib.sha256()
        for kind in KINDS:
            for t in getattr(self, kind) or []:
                h.update(kind.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class PlanRecord:
    """What a plan was made from and how (plan.json besides its experts)."""

    base_model: str
    fingerprint: dict  # of the base model (seap.model.fingerprints): the plan is refused on another one
    method: str
    config: dict  # the PruneConfig, as a dict
    target_ratio: float
    tasks: list[str]
    default_expert: str | None = None
    head_unit: str | None = None  # "heads", "kv_groups" or None (FFN only)
    revision: str | None = None
    corpora: dict = field(default_factory=dict)  # per task: what its statistics were collected on
    seap_version: str | None = None
    extra: dict = field(default_factory=dict)  # anything else recorded beside (e.g. a benchmark's timings)

    @property
    def label(self) -> str:
        """How reports name the plan: method@ratio."""
        return f"{self.method}@{self.target_ratio:g}"

    @property
    def arch(self) -> dict:
        return self.fingerprint["arch"]

    @property
    def prune_config(self) -> PruneConfig:
        """The config the plan was built with (the flat records of plans written before read too)."""
        return PruneConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> PlanRecord:
        """From plan.json; KeyError names a missing required field."""
        names = {f.name for f in fields(cls)} - {"extra"}
        for key in ("base_model", "fingerprint", "method", "config", "target_ratio", "tasks"):
            if key not in data:
                raise KeyError(key)
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names and k not in ("format", "version")})


@dataclass
class Plan:
    meta: PlanRecord
    experts: dict[str, Expert]

    @property
    def head_unit(self) -> str | None:
        return self.meta.head_unit

    def expert(self, name: str | None = None) -> tuple[str, Expert]:
        if name is None:
            name = self.meta.default_expert or next(iter(self.experts))
        if name not in self.experts:
            raise ConfigError(f"plan has no expert {name!r}: choose one of {', '.join(self.experts)}")
        return name, self.experts[name]

    @classmethod
    def probe(cls, experts: dict[str, Expert]) -> Plan:
        """A plan of hand-made experts for measurements in memory (masking one layer, say): no base
        model recorded, so it cannot be saved usefully or checked against a model."""
        return cls(PlanRecord(base_model="", fingerprint={}, method="probe", config={}, target_ratio=0.0,
                              tasks=list(experts)), experts)

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        tensors = {}
        for name, ex in self.experts.items():
            for kind in KINDS:
                for i, t in enumerate(stored_items(getattr(ex, kind) or [])):
                    tensors[f"{name}/{kind}.{i}"] = t if isinstance(t, StoredTensor) else t.contiguous()
        meta = dict(self.meta.to_dict(), format=PLAN_FORMAT, version=PLAN_VERSION,
                    experts={n: {"widths": e.widths(), **e.stats} for n, e in self.experts.items()})
        with atomic_dir(folder) as tmp:
            save_tensors(tmp / "indices.safetensors", tensors)
            (tmp / "plan.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name, ex in self.experts.items():  # on disk now: read from the saved file (its checkpoint may go)
            for kind, weights in ex.stored_weights().items():
                weights.items = [StoredTensor(folder.resolve() / "indices.safetensors", f"{name}/{kind}.{i}")
                                 for i in range(len(weights))]
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Plan:
        folder = prune_output_part(folder, "plan", "plan.json")  # a prune output folder: its plan
        meta, tensors = read_artifact(folder, "plan.json", "indices.safetensors", kind="plan", fmt=PLAN_FORMAT,
                                      version=PLAN_VERSION, missing="give the folder that `seap prune` wrote as <out>/plan",
                                      redo="prune again")
        try:  # the record first: a missing field is named as itself, not as the expert it leaves unreadable
            record = PlanRecord.from_dict({k: v for k, v in meta.items() if k != "experts"})
        except KeyError as err:
            raise ArtifactError(f"plan {folder} is incomplete (plan.json has no field {err}): prune again") from None
        try:
            n_layers = int(record.fingerprint["arch"]["n_layers"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"plan {folder} is damaged (its fingerprint has no layer count: {err!r}): "
                                "prune again") from None
        experts = {}
        try:
            for name, info in meta["experts"].items():
                def get(kind: str) -> Sequence[torch.Tensor] | None:
                    if f"{name}/{kind}.0" not in tensors:
                        return None
                    keys = [f"{name}/{kind}.{i}" for i in range(n_layers)]
                    if kind in REFIT_KINDS:  # read when a layer is sliced, not all at once
                        return TensorList([tensors.stored(k) for k in keys])
                    return [tensors[k] for k in keys]

                ex = Expert(get("ffn"), get("heads"), get("ffn_bias"), get("attn_bias"),
                            {k: v for k, v in info.items() if k != "widths"}, get("ffn_out"), get("attn_out"))
                if ex.ffn is None or ex.widths() != info["widths"]:
                    raise KeyError(f"{name}/ffn")
                experts[name] = ex
        except (KeyError, TypeError, AttributeError) as err:
            raise ArtifactError(f"plan {folder} is incomplete (missing {err}): prune again") from None
        return cls(record, experts)


# -- building -----------------------------------------------------------------------------------
def resolve_head_unit(cfg: PruneConfig, adapter: Adapter, model: nn.Module) -> str | None:
    g = adapter.head_geometry(adapter.layers(model)[0])
    mode = cfg.score.heads
    if mode == "auto":
        return None if g.is_gqa else "heads"
    if mode == "none":
        return None
    if mode == "heads" and g.is_gqa:
        raise ConfigError(f"this model uses grouped-query attention ({g.num_heads} query heads share "
                          f"{g.num_kv_heads} KV heads): a query head cannot be removed alone; use --heads "
                          "kv_groups (whole groups) or --heads none (FFN only)")
    return mode


def layer_scores(cfg: PruneConfig, adapter: Adapter, layer: nn.Module, i: int, ffn_stats: ChannelStats | None,
                 attn_stats: ChannelStats | None, w: LayerWeights,
                 head_unit: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer i's unit scores (FFN channels; heads or KV groups with `head_unit`) for one corpus."""
    ffn = channel_scores(cfg.score.name, stats=ffn_stats, weights=w.ffn, seed=cfg.seed, salt=2 * i)
    if not head_unit:
        return ffn, None
    g = adapter.head_geometry(layer)
    ch = channel_scores(cfg.score.name, stats=attn_stats, weights=w.attn, seed=cfg.seed, salt=2 * i + 1)
    return ffn, group_scores(ch, g.head_dim * (g.group_size if head_unit == "kv_groups" else 1))


def _unit_scores(cfg: PruneConfig, adapter: Adapter, model: nn.Module, stats: ActivationStats | None,
                 head_unit: str | None, weights: WeightSource) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    ffn, heads = [], [] if head_unit else None
    for i, layer in enumerate(adapter.layers(model)):
        s = stats.ffn[i] if stats is not None else None
        a = stats.attn[i] if stats is not None and stats.attn is not None else None
        f, h = layer_scores(cfg, adapter, layer, i, s, a, weights.layer(i), head_unit)
        ffn.append(f)
        if head_unit:
            heads.append(h)
    return ffn, heads


def generic_weights(cfg: PruneConfig, tasks) -> dict[str, float]:
    """The weight of each task's scores in the generic expert (language-modelling text weighs more)."""
    return {t: (cfg.weights.lm if t.split(":")[-1] in LM_CORPORA else cfg.weights.task) for t in tasks}


def experts_of(cfg: PruneConfig, tasks) -> list[str]:
    """The experts a plan over these task corpora holds: one per task, plus the generic one."""
    return [*tasks, GENERIC] if len(tasks) > 1 or cfg.generic else list(tasks)


def fixed_widths(cfg: PruneConfig, adapter: Adapter, model: nn.Module,
                 head_unit: str | None) -> tuple[list[int], list[int] | None] | None:
    """Each layer's kept units when the allocation follows from the geometry alone (uniform, logistic,
    a fitted schedule), known before any statistic; None when it compares scores (adaptive)."""
    if ALLOCATION_NEEDS_SCORES.get(cfg.allocation.name, True):
        return None
    ffn_pool, head_pool = pools(adapter, model, head_unit)
    return allocate(cfg, ffn_pool, head_pool, [], [] if head_pool else None)


def pools(adapter: Adapter, model: nn.Module, head_unit: str | None) -> tuple[Pool, Pool | None]:
    layers = adapter.layers(model)
    ffn = Pool(tuple(adapter.d_ff(l) for l in layers), tuple(adapter.ffn_channel_cost(l) for l in layers))
    if not head_unit:
        return ffn, None
    kv = head_unit == "kv_groups"
    counts = tuple((g.num_kv_heads if kv else g.num_heads) for g in (adapter.head_geometry(l) for l in layers))
    return ffn, Pool(counts, tuple(adapter.head_unit_cost(l, kv) for l in layers))


def allocate(cfg: PruneConfig, ffn_pool: Pool, head_pool: Pool | None, ffn_scores: list[torch.Tensor],
             head_scores: list[torch.Tensor] | None) -> tuple[list[int], list[int] | None]:
    """Kept units per layer for the FFN pool (and the head pool) at the model-wide ratio."""
    cfg = cfg.resolve_multiple(list(ffn_pool.counts))
    pools, scores = ([ffn_pool, head_pool], [ffn_scores, head_scores]) if head_pool else ([ffn_pool], [ffn_scores])
    kept = allocation.allocate(cfg.allocation.name, pools, scores, cfg.settings())
    return kept[0], (kept[1] if head_pool else None)


def bias_compensation(w_out: torch.Tensor, stats: ChannelStats, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: W[:, removed] @ mean(z[removed]), keeping the expected output.
    `stats`: anything with a per-channel `mean` (ChannelStats, reconstruct.Moments)."""
    removed = torch.ones(w_out.shape[1], dtype=torch.bool)
    removed[kept.cpu()] = False
    w = w_out.detach()[:, removed.to(w_out.device)].double().cpu()
    return (w @ stats.mean.cpu().double()[removed]).to(torch.float32)


def build_expert(cfg: PruneConfig, adapter: Adapter, model: nn.Module, ffn_scores: list[torch.Tensor],
                 head_scores: list[torch.Tensor] | None, head_unit: str | None,
                 stats: ActivationStats | None, weights: WeightSource | None = None) -> Expert:
    ffn_pool, head_pool = pools(adapter, model, head_unit)
    ffn_kept, head_kept = allocate(cfg, ffn_pool, head_pool, ffn_scores, head_scores)
    layers = adapter.layers(model)
    ffn_idx = [top_k(s, k) for s, k in zip(ffn_scores, ffn_kept)]
    head_idx = [top_k(s, k) for s, k in zip(head_scores, head_kept)] if head_pool else None
    ex = Expert(ffn_idx, head_idx)
    if cfg.score.bias_compensation:
        if stats is None:
            raise ConfigError("bias compensation needs activation statistics (the mean of removed channels)")
        weights = weights or ModuleWeights(model, adapter)
        ex.ffn_bias = [bias_compensation(weights.out_weight(i, "ffn"), stats.ffn[i], ffn_idx[i])
                       for i in range(len(layers))]
        if head_idx is not None and stats.attn is not None:
            ex.attn_bias = []
            for i, l in enumerate(layers):
                g = adapter.head_geometry(l)
                width = g.head_dim * (g.group_size if head_unit == "kv_groups" else 1)
                ch = (head_idx[i][:, None] * width + torch.arange(width)).flatten()
                ex.attn_bias.append(bias_compensation(weights.out_weight(i, "attn"), stats.attn[i], ch))
    removed = removed_params(ffn_pool, ffn_kept)
    total = ffn_pool.total
    if head_pool:
        removed += removed_params(head_pool, head_kept)
        total += head_pool.total
    ex.stats = {"achieved_ratio": removed / total, "removed_params": int(removed), "prunable_params": int(total)}
    if head_kept is not None:
        ex.stats["heads_kept"] = head_kept
    return ex


def build_plan(model: nn.Module, adapter: Adapter, cfg: PruneConfig, stats_by_task: dict[str, ActivationStats | None],
               *, base_model: str, revision: str | None, fingerprint: dict,
               weights: WeightSource | None = None) -> Plan:
    """One expert per task corpus, plus the generic expert when there are several tasks or asked for.

    `model` gives the geometry (an empty skeleton will do); `weights` the weight norms (default: read
    from `model`, which must then hold its weights)."""
    weights = weights or ModuleWeights(model, adapter)
    cfg = cfg.resolve_multiple([adapter.d_ff(layer) for layer in adapter.layers(model)])
    if not stats_by_task:
        raise ConfigError("no task given: name at least one task corpus")
    source = cfg.allocation.schedule.source if cfg.allocation.schedule is not None else {}
    if "arch_hash" in source and source["arch_hash"] != fingerprint.get("arch_hash"):
        raise ArtifactError(f"the fitted schedule was measured on {source.get('model')}, another model: run "
                            "`seap analyze sensitivity` on this one")
    head_unit = resolve_head_unit(cfg, adapter, model)
    experts: dict[str, Expert] = {}
    raw: dict[str, tuple] = {}
    for task, stats in stats_by_task.items():
        if stats is None and cfg.needs_stats:
            raise ConfigError(f"score {cfg.score.name!r} needs statistics for task {task!r}")
        ffn_s, head_s = _unit_scores(cfg, adapter, model, stats, head_unit, weights)
        raw[task] = (ffn_s, head_s)
        experts[task] = build_expert(cfg, adapter, model, ffn_s, head_s, head_unit, stats, weights)
    if GENERIC in experts_of(cfg, list(stats_by_task)):
        task_weights = generic_weights(cfg, raw)
        ffn_g = [sum(task_weights[t] * raw[t][0][i] for t in raw) for i in range(len(adapter.layers(model)))]
        head_g = None if head_unit is None else [sum(task_weights[t] * raw[t][1][i] for t in raw)
                                                 for i in range(len(adapter.layers(model)))]
        merged = None
        if all(s is not None for s in stats_by_task.values()):
            it = iter(stats_by_task.values())
            merged = next(it)
            for s in it:
                merged = merged.merge(s)
        experts[GENERIC] = build_expert(cfg, adapter, model, ffn_g, head_g, head_unit, merged, weights)
        experts[GENERIC].stats["weights"] = task_weights
    default = GENERIC if cfg.generic or len(stats_by_task) > 1 else next(iter(stats_by_task))
    meta = PlanRecord(
        base_model=base_model, revision=revision, fingerprint=fingerprint, method=cfg.method, config=cfg.to_dict(),
        target_ratio=cfg.ratio, head_unit=head_unit, tasks=list(stats_by_task), default_expert=default,
        corpora={t: (None if s is None else {k: v for k, v in s.meta.items() if k != "fingerprint"})
                 for t, s in stats_by_task.items()},
        seap_version=__version__)
    return Plan(meta, experts)

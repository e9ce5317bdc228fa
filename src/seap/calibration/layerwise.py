"""The statistics pass (docs/design.md §2.1, §2.9) on the calibration engine, for a model in memory
(`collect_stats`) or a checkpoint that never fits in memory (`layerwise_stats`): the same engine, the
same observers, so both give the same statistics.

Streamed, the model is an empty skeleton (`seap.model.skeleton`, accelerate's `init_empty_weights`): the
embeddings are loaded, every batch's layer inputs are caught, the embeddings are freed, and each
decoder layer is read from the shards, run on every batch and freed. Peak memory: one layer, the
embeddings (briefly), the hidden states. A killed streamed pass started again with the same settings
resumes after its last checkpointed layer (seap.calibration.resume).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model.adapters import Adapter, adapter_for_config
from ..model.checkpoint import Checkpoint
from ..model.skeleton import SkeletonLoader, empty_model
from ..model.weights import CheckpointWeights, LayerWeights, UnitWeights
from . import distributed as dist
from .engine import Engine, Outcome, run_pass
from .observers import StatsObserver
from .resume import Resume
from .stats import ActivationStats, ChannelStats, batches, finish_stats, position_limit


def encode_corpora(tokenizer, corpora: dict[str, Sequence[str]], batch_size: int,
                   max_length: int) -> tuple[list[dict[str, torch.Tensor]], list[str], dict[str, int]]:
    """Every corpus tokenised into batches (this process's share of its texts under torchrun), the corpus
    of each batch, and the texts of each corpus (all processes together)."""
    enc, labels, n_texts = [], [], {}
    for name, texts in corpora.items():
        texts = [t for t in texts if t and t.strip()]
        if dist.world_size() > 1 and len(texts) < dist.world_size():  # the same test on every process
            raise ConfigError(f"corpus {name!r} has {len(texts)} texts for {dist.world_size()} processes: every "
                              "process needs at least one; start fewer processes (--nproc-per-node) or give more texts")
        mine = dist.share(texts)
        part = batches(tokenizer, mine, batch_size, max_length)
        enc += part
        labels += [name] * len(part)
        n_texts[name] = len(texts)
    return enc, labels, n_texts


def texts_digest(corpora: dict[str, Sequence[str]]) -> list[list[str]]:
    return [[t, hashlib.sha256("\x00".join(v).encode()).hexdigest()[:16]] for t, v in corpora.items()]


# -- records of a layer ---------------------------------------------------------------------------------------
def stats_record(per_label: dict[str, dict[str, ChannelStats]], w: LayerWeights) -> dict:
    """Layer statistics and weight summary as flat tensors (corpora by position: names may hold '/')."""
    rec: dict = {}
    for j, kinds in enumerate(per_label.values()):
        for kind, s in kinds.items():
            rec.update({f"s/{j}/{kind}/mean": s.mean, f"s/{j}/{kind}/m2": s.m2, f"s/{j}/{kind}/sumsq": s.sumsq,
                        f"s/{j}/{kind}/count": torch.tensor([s.count], dtype=torch.int64)})
    for kind, u in (("ffn", w.ffn), ("attn", w.attn)):
        rec[f"w/{kind}/col_sq"], rec[f"w/{kind}/col_absmean"] = u.col_sq, u.col_absmean
        if u.in_norm is not None:
            rec[f"w/{kind}/in_norm"] = u.in_norm
    return rec


def stats_of_record(rec: dict, labels: Sequence[str]) -> tuple[dict[str, dict[str, ChannelStats]], LayerWeights]:
    out = {}
    for j, lab in enumerate(labels):
        out[lab] = {k: ChannelStats(int(rec[f"s/{j}/{k}/count"][0]), rec[f"s/{j}/{k}/mean"], rec[f"s/{j}/{k}/m2"],
                                    rec[f"s/{j}/{k}/sumsq"]) for k in ("ffn", "attn") if f"s/{j}/{k}/mean" in rec}

    def uw(kind: str) -> UnitWeights:
        return UnitWeights(rec[f"w/{kind}/col_sq"], rec[f"w/{kind}/col_absmean"], rec.get(f"w/{kind}/in_norm"))

    return out, LayerWeights(uw("ffn"), uw("attn"))


# -- the pass -------------------------------------------------------------------------------------------------
@dataclass
class LayerwiseResult:
    stats: dict[str, ActivationStats]
    weights: CheckpointWeights | None
    max_resident_layers: int
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_after: int | None = None  # the last layer a resumed run did not recompute
    hidden_on: str = "device"


def _finish(per_layer: list[dict[str, dict[str, ChannelStats]]], corpora, n_texts, heads, metas, max_length,
            pass_name: str) -> dict[str, ActivationStats]:
    stats = {}
    for t in corpora:
        ffn = [layer[t]["ffn"] for layer in per_layer]
        attn = [layer[t]["attn"] for layer in per_layer] if heads else None
        stats[t] = finish_stats(ffn, attn, dict((metas or {}).get(t, {})), n_texts=n_texts[t], max_length=max_length)
        stats[t].meta["pass"] = pass_name
    return stats


def stats_pass(engine: Engine, corpora: dict[str, Sequence[str]], n_texts: dict[str, int], *, heads: bool,
               max_length: int, metas: dict[str, dict] | None, resume: Resume | None, progress: bool,
               pass_name: str) -> tuple[dict[str, ActivationStats], list[LayerWeights], object]:
    labels = list(corpora)

    def decide(i: int, layer: nn.Module, seen: dict) -> Outcome:
        return Outcome(stats_record(seen["stats"], LayerWeights.of_layer(layer, engine.adapter)))

    res = run_pass(engine, [StatsObserver(labels, heads)], decide, resume=resume, desc="layer-by-layer statistics",
                   progress=progress)
    per_layer, summaries = [], []
    for i in range(engine.n_layers):
        s, w = stats_of_record(res.record(i), labels)
        per_layer.append(s)
        summaries.append(w)
    return _finish(per_layer, corpora, n_texts, heads, metas, max_length, pass_name), summaries, res


@torch.no_grad()
def layerwise_stats(ckpt: Checkpoint, config, tokenizer, corpora: dict[str, Sequence[str]], *, heads: bool = False,
                    batch_size: int = 8, max_length: int = 512, device: torch.device, dtype: torch.dtype,
                    metas: dict[str, dict] | None = None, resume_dir: str | Path | None = None,
                    checkpoint_overhead: float = 0.1, progress: bool = True) -> LayerwiseResult:
    """Activation statistics of each corpus, one decoder layer in memory at a time."""
    t0 = time.time()
    adapter = adapter_for_config(config)
    model = empty_model(config, dtype)
    loader = SkeletonLoader(model, adapter, ckpt)
    max_length = position_limit(config, max_length)
    enc, labels, n_texts = encode_corpora(tokenizer, corpora, batch_size, max_length)
    settings = {"ckpt": str(ckpt.folder.resolve()), "dtype": str(dtype), "device": device.type, "heads": heads,
                "batch": batch_size, "max_length": max_length, "texts": texts_digest(corpora),
                "world_size": dist.world_size()}
    resume = Resume(resume_dir, "stats", settings, overhead=checkpoint_overhead) if resume_dir is not None else None
    if resume is not None:
        resume.check()  # before the embeddings run: a mismatch is refused at once
    engine = Engine(model, adapter, enc, labels, device=device, loader=loader, dtype=dtype)
    stats, summaries, res = stats_pass(engine, corpora, n_texts, heads=heads, max_length=max_length, metas=metas,
                                       resume=resume, progress=progress, pass_name="layerwise")
    if resume is not None:
        resume.clear()
    weights = loader.weights(summaries, device, dtype)
    resumed = res.resumed_from - 1 if res.resumed_from else None
    return LayerwiseResult(stats, weights, loader.resident_max,
                           {"statistics": round(time.time() - t0, 2), **res.seconds}, resumed,
                           "cpu" if engine.offload else "device")


@torch.no_grad()
def collect_stats(model: nn.Module, tokenizer, adapter: Adapter, texts: Sequence[str], *,
                  heads: bool = False, batch_size: int = 8, max_length: int = 512,
                  meta: dict | None = None, progress: bool = True) -> ActivationStats:
    """The activation statistics of a corpus on a model in memory (the engine over its own layers)."""
    max_length = position_limit(model.config, max_length)
    enc, labels, n_texts = encode_corpora(tokenizer, {"t": texts}, batch_size, max_length)
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, adapter, enc, labels, device=adapter.embeddings(model).weight.device)
        stats, _, _ = stats_pass(engine, {"t": texts}, n_texts, heads=heads, max_length=max_length,
                                 metas={"t": meta or {}}, resume=None, progress=progress, pass_name="whole")
    finally:
        model.train(was_training)
    stats["t"].meta.pop("pass", None)
    return stats["t"]


def engine_for(lm, corpora: dict[str, Sequence[str]], *, batch_size: int, max_length: int,
               encoded: tuple | None = None) -> tuple[Engine, dict]:
    """The engine over a model in memory (seap.model.loading.LoadedModel) or streamed from its checkpoint
    (LazyModel), on this process's share of the corpora (`encoded`: encode_corpora's result, when the
    caller has it); and the texts of each corpus."""
    enc, labels, n_texts = encoded or encode_corpora(lm.tokenizer, corpora, batch_size,
                                                     position_limit(lm.model.config, max_length))
    if lm.on_disk:
        skeleton = empty_model(lm.model.config, lm.dtype)
        loader = SkeletonLoader(skeleton, lm.adapter, lm.checkpoint)
        return Engine(skeleton, lm.adapter, enc, labels, device=lm.device, dtype=lm.dtype, loader=loader), n_texts
    lm.model.eval()
    return Engine(lm.model, lm.adapter, enc, labels, device=lm.adapter.embeddings(lm.model).weight.device), n_texts

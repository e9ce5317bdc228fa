"""Reconstruction on the calibration engine (docs/design.md §2.8, §2.10): one pass where the widths are
known, two where they are not.

One pass (`one_pass`): the logistic schedule, uniform widths and a fitted schedule fix every layer's
width from the geometry, so while layer i is resident the engine's observers give its activation
statistics and the Gram matrices of its output linears' inputs, and the layer's scores, channel
choice (the score's, or OBS), refit and errors are settled before layer i+1 is read: the checkpoint
is read once. The plan is then built from the statistics exactly as the two-pass path builds it,
and the layer results replace its experts' channels and output weights. In the sequential mode the
next layer sees the layer pruned and refitted (one pass per expert, each on its own stream).

Two passes (`reconstruct_plan`): a plan built from statistics already taken (FLAP's adaptive
allocation compares every layer's scores first) is refitted in a second pass over the texts.

A layer's results are its record (seap.calibration.resume): a killed run resumes after the last layer whose
outputs were checkpointed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .._io import TensorList
from ..calibration import distributed as dist
from ..calibration.engine import Outcome, run_pass
from ..calibration.observers import GramObserver, StatsObserver
from ..calibration.estimate import model_estimate
from ..calibration.layerwise import _finish, encode_corpora, engine_for, stats_of_record, stats_record, texts_digest
from ..calibration.resume import Resume
from ..calibration.stats import position_limit
from ..config import RefitConfig
from ..core.reconstruct import Moments, cut_errors, obs_select, refit
from ..core.scores import ranking, top_k
from ..errors import ConfigError
from ..tasks import TASKS
from ..model.adapters import Adapter
from ..model.runtime import available_memory, fmt_bytes
from ..model.weights import LayerWeights
from .plan import GENERIC, Expert, Plan, bias_compensation, experts_of, fixed_widths, generic_weights, layer_scores
from .surgery import head_index_sets, layer_masked

log = logging.getLogger(__name__)


# -- one layer of one expert ----------------------------------------------------------------------------
def refit_layer(adapter: Adapter, layer: nn.Module, ffn: torch.Tensor, heads: torch.Tensor | None,
                head_unit: str | None, moments: dict[str, Moments], cfg: RefitConfig,
                store_dtype: torch.dtype, score: torch.Tensor | None = None) -> dict:
    """Layer results of one expert from the moments of its output linears' inputs: kept channels (the
    OBS choice at the score's width with choice "obs"), refitted weights and bias changes, and the FFN
    output errors of the plain cut of the kept channels, FLAP's bias and the refit on the calibration tokens.
    `score`: the layer's FFN channel scores, which bound the OBS choice's search with `cfg.obs_pool`."""
    rec: dict = {}
    units = {"ffn": (adapter.ffn_out(layer), ffn)}
    if heads is not None:
        units["attn"] = (adapter.attn_out(layer), head_index_sets(adapter, layer, heads, head_unit)[0])
    for kind, (lin, scored) in units.items():
        m = moments[kind]
        kept = scored
        if kind == "ffn" and cfg.choice == "obs":
            kept = obs_select(lin.weight, m, len(scored), ridge=cfg.ridge, centered=cfg.centered,
                              removable=obs_removable(score, len(scored), cfg.obs_pool)).to("cpu")
        fit = refit(lin.weight, kept, m, ridge=cfg.ridge, centered=cfg.centered)
        rec[f"{kind}/weight"] = fit.weight.to("cpu", store_dtype)
        if cfg.centered:
            rec[f"{kind}/bias"] = fit.bias_delta.to("cpu", torch.float32)
        if kind == "ffn":
            rec["ffn/kept"] = kept.to("cpu", torch.long)
            # reported figures, not decisions, all of the kept channels: their plain cut, FLAP's bias on them,
            # and the refit's error, which is the cut (mean-compensated when centered) less what the refit
            # explains, so one d x |R|^2 product gives all three
            rec["err/none"], rec["err/bias"] = cut_errors(lin.weight, kept, m, bias_compensation(lin.weight, m, kept),
                                                          dtype=torch.float32)
            rec["err/refit"] = max((rec["err/bias"] if cfg.centered else rec["err/none"]) - fit.explained, 0.0)
    return rec


def obs_removable(score: torch.Tensor | None, n_keep: int, pool: float | None) -> torch.Tensor | None:
    """The channels the OBS choice may remove: the score's lowest `pool` x (channels removed), or None
    (any) without a pool."""
    if pool is None:
        return None
    if score is None:
        raise ConfigError("`obs_pool` bounds the OBS choice by the channel scores, which only the one-pass "
                          "calibration holds (widths fixed by the geometry): drop `obs_pool` or the setting "
                          "that needs a second pass")
    c = score.shape[-1]
    return ranking(score)[max(0, c - math.ceil(pool * (c - n_keep))):]


def identity_layer(adapter: Adapter, layer: nn.Module, head_unit: str | None, cfg: RefitConfig,
                   store_dtype: torch.dtype) -> dict:
    """The results of a layer that keeps every unit, without its moments: what `refit_layer` gives for
    it (the weights as they are, zero bias changes, zero errors), at none of the cost."""
    lin = adapter.ffn_out(layer)
    rec = {"ffn/kept": torch.arange(lin.in_features), "ffn/weight": lin.weight.detach().to("cpu", store_dtype, copy=True),
           "err/none": 0.0, "err/bias": 0.0, "err/refit": 0.0}
    units = ["ffn"]
    if head_unit:
        o = adapter.attn_out(layer)
        rec["attn/weight"] = o.weight.detach().to("cpu", store_dtype, copy=True)
        units.append("attn")
    if cfg.centered:
        for kind in units:
            rec[f"{kind}/bias"] = torch.zeros(rec[f"{kind}/weight"].shape[0], dtype=torch.float32)
    return rec


def _prefixed(rec: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in rec.items()}


def _unprefixed(rec: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}


class _Refits:
    """The refitted expert made from a built one (`base`, left as it is), filled layer by layer from layer
    records (in any order, once each): its channels (the OBS choice where it ran), refitted weights,
    bias changes and errors. `finish` gives the new expert."""

    def __init__(self, base: Expert, n_layers: int, cfg: RefitConfig):
        self.cfg, heads = cfg, base.heads is not None
        self.ex = Expert(
            list(base.ffn), None if base.heads is None else list(base.heads),
            ffn_bias=[None] * n_layers if cfg.centered else None,
            attn_bias=[None] * n_layers if heads and cfg.centered else None, stats=dict(base.stats),
            ffn_out=TensorList([None] * n_layers),  # a weight may stay on disk (StoredTensor) until it is used
            attn_out=TensorList([None] * n_layers) if heads else None)
        self.errors = {k: [0.0] * n_layers for k in ("none", "bias", "refit")}

    def set(self, i: int, rec: dict) -> None:
        ex = self.ex
        ex.ffn[i] = rec["ffn/kept"].to(ex.ffn[i].dtype)
        ex.ffn_out[i] = rec["ffn/weight"]
        if self.cfg.centered:
            ex.ffn_bias[i] = rec["ffn/bias"]
        if ex.attn_out is not None:
            ex.attn_out[i] = rec["attn/weight"]
            if self.cfg.centered:
                ex.attn_bias[i] = rec["attn/bias"]
        for k in self.errors:
            self.errors[k][i] = float(rec[f"err/{k}"])

    def finish(self, tokens: int) -> Expert:
        ex, cfg = self.ex, self.cfg
        ex.stats["reconstruction"] = {
            # "choice": how the kept channels were chosen ("obs": the OBS choice at the score's width,
            # "score": the score's own channels)
            "mode": cfg.mode, "ridge": cfg.ridge, "centered": cfg.centered, "choice": cfg.choice, "tokens": tokens,
            # squared FFN output error on the calibration tokens, per layer, of the kept channels: their
            # plain cut, FLAP's bias on them, and the refit
            "ffn_error": {k: [float(f"{e:.6g}") for e in v] for k, v in self.errors.items()},
        }
        return ex


# -- one pass -----------------------------------------------------------------------------------------------
@dataclass
class OnePass:
    stats: dict  # task -> ActivationStats
    plan: Plan
    summaries: list[LayerWeights]
    seconds: dict[str, float]
    resumed_from: int | None
    tokens_per_process: list[int]
    tokens_by_corpus: dict[str, int]  # over every process
    resume: Resume | None = None  # the checkpoint, whose records the plan's refitted weights are read from

    def release(self) -> None:
        """Remove the checkpoint: call it once the plan is saved and materialised (a run that stops before
        resumes with every layer's record). Plan.save points the refitted weights to its own file."""
        if self.resume is None:
            return
        for ex in self.plan.experts.values():  # weights not yet saved elsewhere (no --out) come into memory
            for weights in ex.stored_weights().values():
                weights.read_in(self.resume.folder)
        self.resume.remove()


def expert_refit(cfg: RefitConfig, name: str) -> RefitConfig:
    """The reconstruction of expert `name`: choice "auto" is OBS for an expert of one of seap's tasks (its
    calibration is that task's prompts), the score's channels for the others (generic, the embedded corpus,
    corpus files), which serve prompts of kinds their text may not hold."""
    return cfg.for_expert(name.strip().lower() in TASKS)


def one_pass_possible(cfg, adapter: Adapter, model: nn.Module, head_unit: str | None, tasks: Sequence[str]) -> bool:
    """Widths fixed by the geometry, and (sequential mode) one expert to stream."""
    if fixed_widths(cfg, adapter, model, head_unit) is None:
        return False
    return cfg.refit.mode != "sequential" or len(experts_of(cfg, list(tasks))) == 1


@torch.no_grad()
def one_pass(lm, cfg, corpora: dict[str, Sequence[str]], refit_cfg: RefitConfig | None, *, head_unit: str | None,
             fingerprint: dict, metas: dict[str, dict], batch_size: int, max_length: int,
             resume_dir=None, progress: bool = True) -> OnePass:
    """Statistics, plan and (with `refit_cfg`) reconstruction of every expert in one pass over the model."""
    from .plan import build_plan

    adapter = lm.adapter
    ffn_w, head_w = fixed_widths(cfg, adapter, lm.model, head_unit)
    tasks = list(corpora)
    experts = experts_of(cfg, tasks)
    members = {n: (n,) if n != GENERIC else tuple(tasks) for n in experts}
    weights_g = generic_weights(cfg, tasks)
    d_ff = [adapter.d_ff(layer) for layer in adapter.layers(lm.model)]
    n_heads = [None] * len(d_ff) if head_w is None else [len(h) for h in _all_heads(adapter, lm.model, head_unit)]
    dense = [ffn_w[i] == d_ff[i] and (head_w is None or head_w[i] == n_heads[i]) for i in range(len(d_ff))]
    kinds = ("ffn", "attn") if head_unit else ("ffn",)
    resume = None
    if resume_dir is not None:  # a resume must see the same run: model, settings, texts, processes
        resume = Resume(resume_dir, "prune", {
            "pass": "one", "model": lm.source.model_id, "fingerprint": fingerprint, "config": cfg.to_dict(),
            "refit": None if refit_cfg is None else vars(refit_cfg), "texts": texts_digest(corpora),
            "batch": batch_size, "max_length": max_length, "dtype": str(lm.dtype),
            "world_size": dist.world_size()})
        resume.check()
    encoded = encode_corpora(lm.tokenizer, corpora, batch_size, position_limit(lm.model.config, max_length))
    sequential = refit_cfg is not None and refit_cfg.mode == "sequential"
    cfgs = {n: expert_refit(refit_cfg, n) for n in experts} if refit_cfg is not None else {}
    est = _estimate(lm, encoded[0], ffn_w, dense, len(cfgs), any(c.choice == "obs" for c in cfgs.values()),
                    sequential, resume is not None)
    _announce(est, encoded[0], len(d_ff))
    engine, n_texts = engine_for(lm, corpora, batch_size=batch_size, max_length=max_length, encoded=encoded)

    def decide(i: int, layer: nn.Module, seen: dict) -> Outcome:
        w = LayerWeights.of_layer(layer, adapter)
        per_task = seen["stats"]
        rec = stats_record(per_task, w)
        if refit_cfg is None:
            return Outcome(rec)
        scores = {t: layer_scores(cfg, adapter, layer, i, per_task[t]["ffn"], per_task[t].get("attn"), w, head_unit)
                  for t in tasks}
        if GENERIC in experts:
            scores[GENERIC] = tuple(None if scores[tasks[0]][k] is None else sum(weights_g[t] * scores[t][k]
                                                                                 for t in tasks) for k in (0, 1))
        for j, name in enumerate(experts):
            ffn = top_k(scores[name][0], ffn_w[i])
            heads = top_k(scores[name][1], head_w[i]) if head_unit else None
            if dense[i]:
                r = identity_layer(adapter, layer, head_unit, cfgs[name], lm.save_dtype)
            else:
                r = refit_layer(adapter, layer, ffn, heads, head_unit, seen["gram"][name], cfgs[name], lm.save_dtype,
                                score=scores[name][0])
            rec.update(_prefixed(r, f"x/{j}/"))
            if heads is not None:
                rec[f"x/{j}/heads"] = heads
        if not sequential:
            return Outcome(rec)
        ex = _layer_expert(i, len(d_ff), rec, "x/0/", cfgs[experts[0]])
        return Outcome(rec, lambda lay: layer_masked(lay, adapter, ex, i, head_unit))

    observers = [StatsObserver(tasks, bool(head_unit))]
    if refit_cfg is not None:
        observers.append(GramObserver(members, kinds))
    res = run_pass(engine, observers, decide, resume=resume, skip_gram=lambda i: dense[i],
                   desc="calibration (statistics, choice, refit)", progress=progress, sequential=sequential)
    per_layer, summaries = zip(*(stats_of_record(res.record(i), tasks) for i in range(engine.n_layers)))
    per_layer, summaries = list(per_layer), list(summaries)
    stats = _finish(per_layer, corpora, n_texts, bool(head_unit), metas, max_length, "one-pass")
    weights = lm.weights
    if hasattr(weights, "summaries"):
        weights.summaries = summaries  # measured on the way: no second read of the weights
    plan = build_plan(lm.model, adapter, cfg, stats, base_model=lm.source.model_id, revision=lm.source.revision,
                      fingerprint=fingerprint, weights=weights)
    for name in experts:
        if plan.experts[name].widths() != list(ffn_w):  # the allocation's widths must not depend on the scores
            raise RuntimeError(f"one-pass widths differ from the plan's for expert {name}")
    if refit_cfg is not None:
        plan = Plan(plan.meta, {**plan.experts, **_refitted(plan, res, engine, members, cfgs)})
    if resume is not None:
        dist.barrier()  # every process has read the records; rank 0 removes them in release()
    by_corpus = {t: sum(dist.gather_ints(engine.tokens_by_label.get(t, 0))) for t in tasks}
    return OnePass(stats, plan, summaries, res.seconds, res.resumed_from, res.tokens_all, by_corpus, resume)


def _announce(est, batches: list[dict], n_layers: int) -> None:
    """The pass's estimate said before it starts, or the refusal of a pass that would not fit."""
    if est.peak_bytes > est.free:
        raise ConfigError(f"this prune needs about {fmt_bytes(est.peak_bytes)} at its peak "
                          f"({', '.join(f'{k} {fmt_bytes(v)}' for k, v in est.peak.items() if v)}) and "
                          f"{fmt_bytes(est.free)} is free{' counting the loaded model' if est.resident else ''}: "
                          "give fewer tokens (--limit, --max-length, --batch-size), fewer tasks (one Gram matrix "
                          "per expert), --refit-choice score, or a device with more memory")
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    dist.log_once(f"one calibration pass over {n_layers} layers, {n_tok:,} calibration tokens"
                  f"{' on this process' if dist.world_size() > 1 else ''}: {est.line()}")


def _refitted(plan: Plan, res, engine, members: dict[str, tuple[str, ...]],
              cfgs: dict[str, RefitConfig]) -> dict[str, Expert]:
    """Each expert refitted from the pass's records (expert j's under the prefix x/j/), its weights left
    in the checkpoint until the layer is sliced."""
    out = {}
    tokens = {name: sum(engine.tokens_by_label.get(c, 0) for c in members[name]) for name in members}
    tokens = {name: sum(dist.gather_ints(n)) for name, n in tokens.items()}
    for j, name in enumerate(members):
        ex = plan.experts[name]
        job = _Refits(ex, engine.n_layers, cfgs[name])
        for i in range(engine.n_layers):
            rec = _unprefixed(res.record(i), f"x/{j}/")
            for k in ("ffn/weight", "attn/weight"):  # the bulk: read again when the layer is sliced
                if k in rec:
                    rec[k] = res.stored(i, f"x/{j}/{k}")
            job.set(i, rec)
            if ex.heads is not None and not torch.equal(rec["heads"], ex.heads[i]):
                raise RuntimeError(f"one-pass heads differ from the plan's in layer {i}")
        out[name] = job.finish(tokens[name])
    return out


def _estimate(lm, enc: list[dict], ffn_w: list[int], dense: list[bool], groups: int, obs: bool, sequential: bool,
              checkpointed: bool):
    return model_estimate(lm.adapter, lm.model, enc, ffn_w, dense, groups=groups, obs=obs, sequential=sequential,
                          streamed=lm.on_disk, dtype=lm.dtype, device=lm.device, store_dtype=lm.save_dtype,
                          checkpointed=checkpointed)


def _all_heads(adapter: Adapter, model: nn.Module, head_unit: str) -> list[range]:
    out = []
    for layer in adapter.layers(model):
        g = adapter.head_geometry(layer)
        out.append(range(g.num_kv_heads if head_unit == "kv_groups" else g.num_heads))
    return out


def _layer_expert(i: int, n_layers: int, rec: dict, prefix: str, cfg: RefitConfig) -> Expert:
    """An expert that holds only layer i's results (for the sequential pass's pruned re-run)."""
    r = _unprefixed(rec, prefix)
    job = _Refits(Expert([None] * n_layers, [None] * n_layers if "heads" in r else None), n_layers, cfg)
    job.ex.ffn[i] = r["ffn/kept"]
    if "heads" in r:
        job.ex.heads[i] = r["heads"]
    job.set(i, r)
    return job.ex


# -- two passes: the refit of a built plan --------------------------------------------------------------
@torch.no_grad()
def reconstruct_plan(lm, plan: Plan, corpora: dict[str, Sequence[str]], cfg: RefitConfig, *,
                     members: dict[str, Sequence[str]] | None = None, batch_size: int = 8, max_length: int = 512,
                     progress: bool = True) -> Plan:
    """A new plan whose experts of `members` are refitted (output linears, and the OBS choice of their
    channels where it runs) on the texts their channels were chosen from, one decoder layer at a time,
    for a model streamed from its checkpoint as for one in memory; `plan` itself is left as it was.

    `corpora`: name -> texts; `members`: expert -> the corpora it was calibrated on (default: each
    corpus is the expert of that name). In the refit mode the experts share one pass when their Gram
    matrices fit in a quarter of the free memory; otherwise, and in the sequential mode (each expert
    its own pruned stream), one pass per expert."""
    members = members or {name: (name,) for name in corpora}
    missing = sorted({c for cs in members.values() for c in cs} - set(corpora))
    if missing:
        raise ConfigError(f"no calibration texts for corpora {', '.join(missing)}")
    device = lm.device
    widths = [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(lm.model)]
    gram_bytes = len(members) * max(widths) ** 2 * 8 * (2 if plan.head_unit else 1)
    if cfg.mode == "refit" and len(members) > 1 and gram_bytes <= available_memory(device) // 4:
        groups = [dict(members)]
    else:
        groups = [{name: cs} for name, cs in members.items()]
    refitted: dict[str, Expert] = {}
    for group in groups:
        refitted.update(refit_experts(lm, plan, {c: corpora[c] for cs in group.values() for c in cs}, group, cfg,
                                      batch_size=batch_size, max_length=max_length, progress=progress))
    for name, ex in refitted.items():
        rec = ex.stats["reconstruction"]
        e = rec["ffn_error"]
        log.info("reconstructed expert %s on %d tokens: FFN output error %.3f of the plain cut (FLAP's bias: %.3f)",
                 name, rec["tokens"], sum(e["refit"]) / (sum(e["none"]) or 1), sum(e["bias"]) / (sum(e["none"]) or 1))
    return Plan(plan.meta, {**plan.experts, **refitted})


def refit_experts(lm, plan: Plan, corpora: dict[str, Sequence[str]], members: dict[str, Sequence[str]],
                  cfg: RefitConfig, *, batch_size: int, max_length: int, progress: bool) -> dict[str, Expert]:
    """One pass over `corpora` that refits the experts of `members` (one expert in the sequential mode):
    the new experts, by name."""
    if cfg.mode == "sequential" and len(members) > 1:
        raise ConfigError("the sequential mode refits one expert per pass (each sees its own pruned stream)")
    engine, _ = engine_for(lm, corpora, batch_size=batch_size, max_length=max_length)
    kinds = ("ffn", "attn") if plan.head_unit else ("ffn",)
    names = list(members)
    cfgs = {n: expert_refit(cfg, n) for n in names}
    jobs = {n: _Refits(plan.experts[n], engine.n_layers, cfgs[n]) for n in names}

    def decide(i: int, layer: nn.Module, seen: dict) -> Outcome:
        rec = {}
        for n in names:
            ex = plan.experts[n]
            heads = ex.heads[i] if ex.heads is not None else None
            r = refit_layer(lm.adapter, layer, ex.ffn[i], heads, plan.head_unit, seen["gram"][n], cfgs[n],
                            lm.save_dtype)
            jobs[n].set(i, r)
            rec.update(_prefixed(r, f"x/{n}/"))
        if cfg.mode != "sequential":
            return Outcome(rec)
        # the next layer sees this one pruned and refitted: the new expert, which holds layer i by now
        return Outcome(rec, lambda lay: layer_masked(lay, lm.adapter, jobs[names[0]].ex, i, plan.head_unit))

    desc = "reconstruction" if len(names) > 1 else f"reconstruction ({names[0]})"
    run_pass(engine, [GramObserver(members, kinds)], decide, desc=desc, progress=progress,
             sequential=cfg.mode == "sequential")
    return {n: jobs[n].finish(sum(dist.gather_ints(sum(engine.tokens_by_label.get(c, 0) for c in members[n]))))
            for n in names}


def error_summary(ex) -> dict | None:
    """Model-wide relative error of the refit against the plain cut and FLAP's bias (for reports)."""
    rec = ex.stats.get("reconstruction")
    if not rec:
        return None
    e = rec["ffn_error"]
    base = sum(e["none"]) or 1.0
    return {"bias / cut": sum(e["bias"]) / base, "refit / cut": sum(e["refit"]) / base}

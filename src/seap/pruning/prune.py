"""collect -> plan -> slice -> save, whole in memory or layer by layer, with a summary.

The path is chosen by `seap.model.loading.open_model` from the memory free (or forced by Runtime.load):
a model that fits is loaded whole; a bigger safetensors checkpoint stays on disk, its statistics
come from the layer-by-layer pass (seap.calibration.layerwise) and its pruned copy is streamed from the
source shards (seap.pruning.streaming). Both paths give the same statistics, plan and files.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .._io import write_json, write_text
from ..calibration import distributed as dist
from ..calibration.layerwise import collect_stats, texts_digest
from ..calibration.stats import ActivationStats
from ..config import DEFAULT_TASKS, CalibrationData, PruneConfig
from ..errors import ConfigError
from ..model.checkpoint import DEFAULT_SHARD_BYTES, parse_size
from ..model.fingerprints import check_fingerprint, fingerprint
from ..model.loading import LoadedModel, OpenModel, runtime_record, use_or_open
from ..model.pruned_folder import save_pruned
from ..model.runtime import Runtime
from ..outputs import PRUNE_PARTS, Output, locked, output_folder
from ..tasks import check_corpus_spec, resolve_corpus
from .plan import GENERIC, Plan, build_plan, resolve_head_unit
from .refit_pass import one_pass, one_pass_possible, reconstruct_plan
from .surgery import count_params, ffn_params, slice_model

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TASKS", "CalibrationData", "PruneResult", "apply", "collect", "prune"]
Model = str | OpenModel | None


def open_for_pruning(model: Model, runtime: Runtime | None = None) -> OpenModel:
    return use_or_open(model, runtime, streamable=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)


def _collect(lm: OpenModel, tasks: Sequence[str], *, data_dir, limit, heads: bool, batch_size: int,
             max_length: int, out, seed: int, progress: bool) -> dict[str, ActivationStats]:
    """Statistics per task; those already in `out` for the same model are reused, the rest are
    collected in one pass (one whole-model pass per task, or one layer-by-layer pass for all)."""
    fp = fingerprint(lm.model, lm.adapter, lm.weights)
    result: dict[str, ActivationStats | None] = {}
    todo: dict[str, tuple] = {}
    for task in tasks:
        path = Path(out) / f"{_safe(task)}.safetensors" if out else None
        corpus = resolve_corpus(task, data_dir=data_dir, limit=limit, seed=seed)
        cached = _cached_stats(lm, path, heads, limit, corpus)
        if cached is not None:
            log.info("reusing statistics %s", path)
            result[task] = cached
            continue
        todo[task] = (corpus, _stats_meta(lm, fp, task, corpus, limit), path)
        result[task] = None
    if todo and not lm.on_disk:
        for task, (corpus, meta, path) in todo.items():
            result[task] = collect_stats(lm.model, lm.tokenizer, lm.adapter, corpus.texts, heads=heads,
                                         batch_size=batch_size, max_length=max_length, meta=meta, progress=progress)
    elif todo:
        from ..calibration.layerwise import layerwise_stats

        texts = {t: c.texts for t, (c, _, _) in todo.items()}
        res = layerwise_stats(lm.checkpoint, lm.model.config, lm.tokenizer, texts,
                              heads=heads, batch_size=batch_size, max_length=max_length, device=lm.device,
                              dtype=lm.dtype, metas={t: m for t, (_, m, _) in todo.items()}, resume_dir=out,
                              progress=progress)
        lm.weights.summaries = res.weights.summaries  # measured on the way: no second read of the weights
        result.update(res.stats)
    for task, (_, _, path) in todo.items():
        if path is not None and dist.is_main():  # under torchrun, rank 0 writes
            result[task].save(path)
    return result  # type: ignore[return-value]


def _cached_stats(lm, path: Path | None, heads: bool, limit: int | None, corpus) -> ActivationStats | None:
    """The statistics saved at `path` when they fit this run: refused when corrupt or of another model,
    recollected when taken with other settings or from other texts (an edited corpus file, a grown
    embedded corpus, or a file written before the texts were recorded)."""
    if path is None or not path.is_file():
        return None
    cached = ActivationStats.load(path)
    check_fingerprint(cached.meta.get("fingerprint", {}), lm.model, lm.adapter, "statistics file", weights=lm.weights)
    fits = (cached.attn is not None) >= heads and cached.meta.get("limit") == limit
    return cached if fits and cached.meta.get("texts") == _texts_digest(corpus) else None


def _texts_digest(corpus) -> str:
    return texts_digest({corpus.name: corpus.texts})[0][1]


def _stats_meta(lm, fp: dict, task: str, corpus, limit: int | None) -> dict:
    return {"model": lm.source.model_id, "revision": lm.source.revision, "fingerprint": fp, "corpus": task,
            "source": corpus.source, "limit": limit, "texts": _texts_digest(corpus)}


def collect(model: Model = None, data: CalibrationData | Sequence[str] | None = None, out: str | Path | None = None,
            *, heads: bool = False, seed: int = 0, progress: bool = True,
            runtime: Runtime | None = None, wait: bool = False) -> dict[str, ActivationStats]:
    """Activation statistics of each task corpus of `data` (saved as <out>/<task>.safetensors when out is
    given; default out: data.stats_dir). `heads`: per-head statistics too. `wait`: when another run is
    writing `out`, wait for it instead of refusing (seap.outputs).

    Statistics already in `out` for the same model are reused instead of recomputed; a killed
    layer-by-layer pass with the same settings resumes from its last checkpoint in `out`."""
    data = CalibrationData.of(data)
    for t in data.tasks:  # a bad name is refused before the model loads
        check_corpus_spec(t, data_dir=data.data_dir)
    dist.init((runtime or Runtime()).torch_device)
    out = out or data.stats_dir
    parts = [f"{_safe(t)}.safetensors" for t in data.tasks]
    with output_folder(out, "seap collect", parts, wait=wait, enabled=dist.is_main()) as output:
        lm = open_for_pruning(model, runtime)
        output.begin()
        stats = _collect(lm, data.tasks, data_dir=data.data_dir, limit=data.limit, heads=heads,
                         batch_size=data.batch_size, max_length=data.max_length, out=out, seed=seed, progress=progress)
        output.commit()
    return stats


@dataclass
class PruneResult:
    plan: Plan
    expert: str
    out: Path | None
    params_before: int
    params_after: int
    ffn_before: int
    ffn_after: int
    widths: list[int]
    seconds: float
    files: dict = field(default_factory=dict)
    model: LoadedModel | None = None  # the sliced model in memory (the whole-model path only)
    path: str = "whole"  # "whole" or "layerwise"
    stage_seconds: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # device, compute dtype, saved dtype
    max_resident_layers: int | None = None  # decoder layers in memory at once (layer-by-layer path)
    bytes_written: int | None = None
    calibration: dict = field(default_factory=dict)  # passes, world size, tokens per process, resume

    def summary(self) -> dict:
        ex = self.plan.experts[self.expert]
        return {
            "base_model": self.plan.meta.base_model, "method": self.plan.meta.method,
            "expert": self.expert, "experts": list(self.plan.experts),
            "target_ratio": self.plan.meta.target_ratio, "achieved_ratio": ex.stats["achieved_ratio"],
            "params_before": self.params_before, "params_after": self.params_after,
            "total_reduction": 1 - self.params_after / self.params_before,
            "ffn_params_before": self.ffn_before, "ffn_params_after": self.ffn_after,
            "ffn_widths": self.widths, "heads_kept": ex.stats.get("heads_kept"),
            "seconds": round(self.seconds, 1), "files": self.files, "path": self.path,
            "stage_seconds": self.stage_seconds, "runtime": self.runtime,
            "max_resident_layers": self.max_resident_layers, "bytes_written": self.bytes_written,
            "calibration": self.calibration, "world_size": self.calibration.get("world_size", 1),
            "reconstruction": {k: v for k, v in (ex.stats.get("reconstruction") or {}).items() if k != "ffn_error"},
        }

    def markdown(self) -> str:
        s = self.summary()
        rows = [
            ("base model", s["base_model"]), ("method / expert", f"{s['method']} / {s['expert']}"),
            ("target ratio (prunable params)", f"{s['target_ratio']:.4f}"),
            ("achieved ratio", f"{s['achieved_ratio']:.4f}"),
            ("parameters", f"{s['params_before']:,} -> {s['params_after']:,} (-{100 * s['total_reduction']:.1f}%)"),
            ("FFN parameters", f"{s['ffn_params_before']:,} -> {s['ffn_params_after']:,}"),
            ("FFN widths", _widths_brief(s["ffn_widths"])),
            ("path", f"{s['path']} ({', '.join(f'{k} {v}' for k, v in s['runtime'].items())})"),
            ("seconds per stage", ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items())),
        ]
        rows += [(k, str(v)) for k, v in s["files"].items()]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def _widths_brief(widths: list[int]) -> str:
    if len(set(widths)) == 1:
        return f"{widths[0]} in all {len(widths)} layers"
    return ", ".join(str(w) for w in widths)


class _Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.time()

    def done(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 2)
        self._t = now


def prune(model: Model = None, config: PruneConfig | None = None, data: CalibrationData | Sequence[str] | None = None,
          out: str | Path | None = None, *, expert: str | None = None, runtime: Runtime | None = None,
          shard_size: str | int = DEFAULT_SHARD_BYTES, progress: bool = True, wait: bool = False) -> PruneResult:
    """Statistics -> plan -> physically pruned model, saved under `out` (plan/, model/, summary).

    `model`: a bundled name, hub id or folder (or a model already opened); `config`: what to prune
    (default: the `seap` preset at 50%); `data`: the calibration corpora (a CalibrationData, or task
    names; default the embedded corpus). `expert`: the plan expert to materialise (default: the plan's).
    A schedule measured by `seap analyze sensitivity` is part of the config (PruneConfig.schedule, from
    `seap.analyze.schedule.load_schedule`), refused on another model. `runtime`: device, dtype and whole /
    layer-by-layer loading; `shard_size` of the saved shards. `out` is written as one artifact
    (seap.outputs): locked while it is written (`wait`: wait for another run instead of refusing),
    marked incomplete until its manifest is written last."""
    t0 = time.time()
    stages = _Stages()
    config = config or PruneConfig.from_method("seap")
    data = CalibrationData.of(data)
    max_shard = parse_size(shard_size)
    for t in data.tasks:  # a bad name is refused before the model loads
        check_corpus_spec(t, data_dir=data.data_dir)
    dist.init((runtime or Runtime()).torch_device)
    sdir = data.stats_dir or (Path(out) / "stats" if out else None)
    with _prune_outputs(out, sdir, wait) as output:
        return _prune(output, model, config, data, out, sdir, expert, runtime, max_shard, progress, t0, stages)


@contextmanager
def _prune_outputs(out, sdir, wait: bool) -> Iterator[Output]:
    """The output folder (locked, committed by its manifest) and, outside it, the statistics folder (locked)."""
    with ExitStack() as stack:
        output = stack.enter_context(output_folder(out, "seap prune", PRUNE_PARTS, wait=wait,
                                                   enabled=dist.is_main(), discard_parts=True))
        if sdir is not None and (out is None or Path(out).resolve() not in Path(sdir).resolve().parents):
            stack.enter_context(locked(sdir, "seap prune", wait=wait, enabled=dist.is_main()))
        yield output


def _prune(output: Output, model, config: PruneConfig, data: CalibrationData, out, sdir, expert, runtime,
           max_shard: int, progress: bool, t0: float, stages: _Stages) -> PruneResult:
    tasks, data_dir, limit = data.tasks, data.data_dir, data.limit
    batch_size, max_length = data.batch_size, data.max_length
    lm = open_for_pruning(model, runtime)
    if lm.on_disk and not out:
        raise ConfigError("the layer-by-layer path writes the pruned model to disk: give an output folder (--out)")
    if config.allocation.schedule is not None and "fingerprint" in config.allocation.schedule.source:
        check_fingerprint(config.allocation.schedule.source["fingerprint"], lm.model, lm.adapter, "fitted schedule",
                          weights=lm.weights)
    fp = fingerprint(lm.model, lm.adapter, lm.weights)
    head_unit = resolve_head_unit(config, lm.adapter, lm.model)
    heads = head_unit is not None
    stages.done("load")
    refit_cfg = config.refit.resolved(lm.adapter, lm.model.config) if config.reconstructs else None
    corpora = {}
    if refit_cfg is not None:  # bad data or statistics of another model are refused before the allocation runs
        corpora = {t: resolve_corpus(t, data_dir=data_dir, limit=limit, seed=config.seed) for t in tasks}
        for t in tasks:
            _cached_stats(lm, Path(sdir) / f"{_safe(t)}.safetensors" if sdir else None, heads, limit, corpora[t])
    one = refit_cfg is not None and one_pass_possible(config, lm.adapter, lm.model, head_unit, tasks)
    if refit_cfg is not None and refit_cfg.obs_pool is not None and not one:
        raise ConfigError("`obs_pool` bounds the OBS choice by the channel scores, which only the one-pass "
                          "calibration holds: it needs widths fixed by the geometry (not the adaptive allocation) "
                          "and, with the sequential mode, one expert; drop `obs_pool` or that setting")
    if one:
        op = one_pass(lm, config, {t: c.texts for t, c in corpora.items()}, refit_cfg, head_unit=head_unit,
                      fingerprint=fp, metas={t: _stats_meta(lm, fp, t, c, limit) for t, c in corpora.items()},
                      batch_size=batch_size, max_length=max_length, resume_dir=sdir, progress=progress)
        if sdir is not None and dist.is_main():
            for t, st in op.stats.items():
                st.save(Path(sdir) / f"{_safe(t)}.safetensors")
        plan, release = op.plan, op.release
        stages.done("calibration")
        calibration = {"passes": 1, "world_size": dist.world_size(), "tokens_per_process": op.tokens_per_process,
                       "resumed_from_layer": op.resumed_from, "seconds": op.seconds,
                       "corpora": {t: {"source": c.source, "texts": len(c), "tokens": op.tokens_by_corpus[t]}
                                   for t, c in corpora.items()}}
    else:
        release = lambda: None  # noqa: E731 - the two passes keep no checkpoint past their end
        plan, calibration = _two_pass(lm, config, tasks, fp, heads, data_dir=data_dir, limit=limit,
                                      batch_size=batch_size, max_length=max_length, sdir=sdir, progress=progress,
                                      stages=stages)
    if not dist.is_main():  # rank 0 writes the artifacts; the others only helped calibrate
        ex = plan.expert(expert)[1]
        return PruneResult(plan, plan.expert(expert)[0], None, 0, 0, 0, 0, ex.widths(), time.time() - t0,
                           calibration=calibration)
    plan.expert(expert)  # a wrong --expert is refused before the folder is touched
    if out:
        out = Path(out)
        output.begin()  # from here until the manifest, the folder is marked incomplete
        files = {"plan": str(plan.save(out / "plan"))}
    res = _materialise(lm, plan, expert, out / "model" if out else None, max_shard, progress)
    release()  # the checkpoint the refitted weights were read from: kept until the model is saved
    stages.done("slice_and_save")
    if out:
        res.files = {**files, **res.files}
        if config.needs_stats:
            res.files["stats"] = str(sdir)
    res.out = Path(out) if out else None
    res.seconds = time.time() - t0
    res.stage_seconds = stages.seconds
    res.calibration = calibration
    if out:
        write_json(out / "summary.json", res.summary())
        write_text(out / "summary.md", res.markdown())
        output.commit()
    return res


def _two_pass(lm, config: PruneConfig, tasks, fp: dict, heads: bool, *, data_dir, limit, batch_size, max_length,
              sdir, progress: bool, stages) -> tuple[Plan, dict]:
    """Statistics, then the plan, then (with reconstruction) a second pass that refits it."""
    if config.needs_stats:
        stats = _collect(lm, tasks, data_dir=data_dir, limit=limit, heads=heads, batch_size=batch_size,
                         max_length=max_length, out=sdir, seed=config.seed, progress=progress)
    else:
        stats = {t: None for t in tasks}
    stages.done("statistics")
    plan = build_plan(lm.model, lm.adapter, config, stats, base_model=lm.source.model_id,
                      revision=lm.source.revision, fingerprint=fp, weights=lm.weights)
    stages.done("plan")
    passes = 1 if config.needs_stats else 0
    if config.reconstructs:
        plan = reconstruct(lm, plan, config, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                           max_length=max_length, progress=progress)
        stages.done("reconstruction")
        passes += 1
    return plan, {"passes": passes, "world_size": dist.world_size()}


def expert_corpora(plan: Plan, tasks: Sequence[str], *, data_dir=None, limit: int | None = None,
                   seed: int = 0) -> tuple[dict[str, list[str]], dict[str, tuple[str, ...]]]:
    """The calibration texts of each task, and the tasks of each expert of a plan: a task expert's
    own; the generic expert's, all of them."""
    texts = {t: list(resolve_corpus(t, data_dir=data_dir, limit=limit, seed=seed).texts) for t in tasks}
    members = {}
    for name in plan.experts:
        if name in texts:
            members[name] = (name,)
        elif name == GENERIC:
            members[name] = tuple(tasks)
    return texts, members


def reconstruct(lm: OpenModel, plan: Plan, config: PruneConfig, tasks: Sequence[str], *,
                data_dir=None, limit: int | None = None, batch_size: int = 8, max_length: int = 512,
                progress: bool = True) -> Plan:
    """A new plan with every expert of `plan` refitted on its calibration corpus (docs/design.md §2.8)."""
    texts, members = expert_corpora(plan, tasks, data_dir=data_dir, limit=limit, seed=config.seed)
    return reconstruct_plan(lm, plan, texts, config.refit.resolved(lm.adapter, lm.model.config), members=members,
                            batch_size=batch_size, max_length=max_length, progress=progress)


@torch.no_grad()
def _as_saved(model: torch.nn.Module, save_dtype: torch.dtype) -> None:
    """Round the in-memory pruned model to the values its folder holds: a bias that reconstruction or
    bias compensation added is computed in float32 and saved in the checkpoint's dtype (bf16), and
    the model a prune returns must compute what the saved one does. Weights read from that dtype are
    unchanged."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != save_dtype and p.device.type != "meta":
            p.data = p.data.to(save_dtype).to(p.dtype)


def _materialise(lm: OpenModel, plan: Plan, expert: str | None, folder: Path | None,
                 max_shard: int, progress: bool) -> PruneResult:
    """The plan's expert as a pruned model: sliced in memory (and saved), or streamed to `folder`."""
    name, _ = plan.expert(expert)
    before, ffn_before = count_params(lm.model), ffn_params(lm.model, lm.adapter)
    if lm.on_disk:
        from .streaming import write_streamed

        w = write_streamed(lm.checkpoint, lm.model.config, lm.tokenizer, plan, name, folder,
                           dtype=lm.save_dtype, max_shard_bytes=max_shard, progress=progress)
        layout = w.layout
        res = PruneResult(plan, name, None, before, count_params(layout), ffn_before, ffn_params(layout, lm.adapter),
                          [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(layout)], 0.0,
                          files={"model": str(w.folder)}, path="layerwise", max_resident_layers=w.max_resident_layers,
                          bytes_written=w.bytes_written)
    else:
        slice_model(lm.model, lm.adapter, plan, name, check=False)
        _as_saved(lm.model, lm.save_dtype)
        res = PruneResult(plan, name, None, before, count_params(lm.model), ffn_before,
                          ffn_params(lm.model, lm.adapter),
                          [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(lm.model)], 0.0, model=lm)
        if folder is not None:
            res.files = {"model": str(save_pruned(lm.model, lm.tokenizer, folder, dtype=lm.save_dtype,
                                                  max_shard_bytes=max_shard))}
            res.bytes_written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    res.runtime = runtime_record(lm)
    return res


def apply(model: Model, plan: str | Path | Plan, *, expert: str | None = None, out: str | Path | None = None,
          runtime: Runtime | None = None, shard_size: str | int = DEFAULT_SHARD_BYTES,
          progress: bool = True, wait: bool = False) -> PruneResult:
    """Apply a saved plan to its base model (refused for any other model) and save the result
    (streamed from the shards when the model is not loaded whole) as one artifact (seap.outputs)."""
    t0 = time.time()
    max_shard = parse_size(shard_size)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)  # a bad plan is refused before the model loads
    plan.expert(expert)
    with output_folder(out, "seap apply", None, wait=wait) as output:
        lm = open_for_pruning(model, runtime)
        if lm.on_disk and not out:
            raise ConfigError("the layer-by-layer path writes the pruned model to disk: give an output folder (--out)")
        check_fingerprint(plan.meta.fingerprint, lm.model, lm.adapter, weights=lm.weights)
        output.begin()
        res = _materialise(lm, plan, expert, Path(out) if out else None, max_shard, progress)
        output.commit()
    res.out = Path(out) if out else None
    res.seconds = time.time() - t0
    return res

"""The Python API behind the CLI: collect -> plan -> slice -> save, with a summary."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ._io import write_json, write_text
from .config import PruneConfig
from .errors import ArtifactError, ConfigError
from .models import LoadedModel, check_fingerprint, fingerprint, load_model
from .plan import Plan, build_plan, resolve_head_unit
from .router import Router, RouterConfig, RouterEval, Route
from .pruned import read_record, save_pruned
from .stats import ActivationStats, collect_stats
from .surgery import count_params, ffn_params, slice_model
from .tasks import resolve_corpus

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("default",)


def _load(model: str | LoadedModel | None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def collect(model: str | LoadedModel | None = None, tasks: Sequence[str] = DEFAULT_TASKS, *,
            data_dir: str | Path | None = None, limit: int | None = None, heads: bool = False,
            batch_size: int = 8, max_length: int = 512, out: str | Path | None = None, seed: int = 0,
            progress: bool = True) -> dict[str, ActivationStats]:
    """Activation statistics of each task corpus (saved as <out>/<task>.safetensors when out is given).

    Statistics already in `out` for the same model are reused instead of recomputed.
    """
    lm = _load(model)
    fp = fingerprint(lm.model, lm.adapter)
    result = {}
    for task in tasks:
        path = Path(out) / f"{_safe(task)}.safetensors" if out else None
        if path is not None and path.is_file():
            cached = ActivationStats.load(path)
            check_fingerprint(cached.meta.get("fingerprint", {}), lm.model, lm.adapter, "statistics file")
            if (cached.attn is not None) >= heads and cached.meta.get("limit") == limit:
                log.info("reusing statistics %s", path)
                result[task] = cached
                continue
        corpus = resolve_corpus(task, data_dir=data_dir, limit=limit, seed=seed)
        meta = {"model": lm.source.model_id, "revision": lm.source.revision, "fingerprint": fp,
                "corpus": task, "source": corpus.source, "limit": limit}
        stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, corpus.texts, heads=heads,
                              batch_size=batch_size, max_length=max_length, meta=meta, progress=progress)
        if path is not None:
            stats.save(path)
        result[task] = stats
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)


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
    model: LoadedModel | None = None

    def summary(self) -> dict:
        ex = self.plan.experts[self.expert]
        return {
            "base_model": self.plan.meta["base_model"], "method": self.plan.meta["method"],
            "expert": self.expert, "experts": list(self.plan.experts),
            "target_ratio": self.plan.meta["target_ratio"], "achieved_ratio": ex.stats["achieved_ratio"],
            "params_before": self.params_before, "params_after": self.params_after,
            "total_reduction": 1 - self.params_after / self.params_before,
            "ffn_params_before": self.ffn_before, "ffn_params_after": self.ffn_after,
            "ffn_widths": self.widths, "heads_kept": ex.stats.get("heads_kept"),
            "seconds": round(self.seconds, 1), "files": self.files,
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
        ]
        rows += [(k, str(v)) for k, v in s["files"].items()]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def _widths_brief(widths: list[int]) -> str:
    if len(set(widths)) == 1:
        return f"{widths[0]} in all {len(widths)} layers"
    return ", ".join(str(w) for w in widths)


def prune(model: str | LoadedModel | None = None, tasks: Sequence[str] = DEFAULT_TASKS, *,
          config: PruneConfig | None = None, data_dir: str | Path | None = None, out: str | Path | None = None,
          expert: str | None = None, limit: int | None = None, batch_size: int = 8, max_length: int = 512,
          stats_dir: str | Path | None = None, progress: bool = True, schedule: str | Path | None = None) -> PruneResult:
    """Statistics -> plan -> physically pruned model, saved under `out` (plan/, model/, summary).
    `schedule`: a sensitivity.json of `seap analyze sensitivity` (allocation logistic-fitted, same model only)."""
    t0 = time.time()
    config = config or PruneConfig()
    lm = _load(model)
    if schedule is not None:
        from .analyze.schedule import load_schedule

        config = load_schedule(schedule).configure(config, lm)
    fp = fingerprint(lm.model, lm.adapter)
    heads = resolve_head_unit(config, lm.adapter, lm.model) is not None
    if config.needs_stats:
        sdir = stats_dir or (Path(out) / "stats" if out else None)
        stats = collect(lm, tasks, data_dir=data_dir, limit=limit, heads=heads, batch_size=batch_size,
                        max_length=max_length, out=sdir, seed=config.seed, progress=progress)
    else:
        stats = {t: None for t in tasks}
    plan = build_plan(lm.model, lm.adapter, config, stats, base_model=lm.source.model_id,
                      revision=lm.source.revision, fingerprint=fp)
    res = _slice(lm, plan, expert, out)
    if out:
        out = Path(out)
        res.files = {"plan": str(plan.save(out / "plan")),
                     "model": str(save_pruned(lm.model, lm.tokenizer, out / "model"))}
        if config.needs_stats:
            res.files["stats"] = str(stats_dir or out / "stats")
    res.seconds = time.time() - t0
    if out:
        write_json(out / "summary.json", res.summary())
        write_text(out / "summary.md", res.markdown())
    return res


def _slice(lm: LoadedModel, plan: Plan, expert: str | None, out) -> PruneResult:
    """Slice the loaded model to one expert and count what went."""
    before, ffn_before = count_params(lm.model), ffn_params(lm.model, lm.adapter)
    name, _ = plan.expert(expert)
    slice_model(lm.model, lm.adapter, plan, name, check=False)
    widths = [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(lm.model)]
    return PruneResult(plan, name, Path(out) if out else None, before, count_params(lm.model), ffn_before,
                       ffn_params(lm.model, lm.adapter), widths, 0.0, model=lm)


def apply(model: str | LoadedModel | None, plan: str | Path | Plan, *, expert: str | None = None,
          out: str | Path | None = None) -> PruneResult:
    """Apply a saved plan to its base model (refused for any other model) and save the result."""
    t0 = time.time()
    lm = _load(model)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    check_fingerprint(plan.meta["fingerprint"], lm.model, lm.adapter)
    res = _slice(lm, plan, expert, out)
    if out:
        res.files = {"model": str(save_pruned(lm.model, lm.tokenizer, out))}
    res.seconds = time.time() - t0
    return res


def info(path: str | Path) -> dict:
    """What a plan folder or a pruned model folder contains."""
    path = Path(path)
    if (path / "plan.json").is_file():
        plan = Plan.load(path)
        arch = plan.meta["fingerprint"]["arch"]
        return {
            "kind": "plan", "base_model": plan.meta["base_model"], "method": plan.meta["method"],
            "score": plan.meta["config"]["score"], "allocation": plan.meta["config"]["allocation"],
            "target_ratio": plan.meta["target_ratio"], "head_unit": plan.head_unit,
            "dense_ffn_widths": arch["d_ff"], "default_expert": plan.meta.get("default_expert"),
            "experts": {n: {"ffn_widths": e.widths(), **e.stats} for n, e in plan.experts.items()},
        }
    if (path / "config.json").is_file():
        data = read_record(path)
        rec = data["seap_pruning"]
        lm = load_model(str(path))
        return {
            "kind": "pruned model", "base_model": rec["base_model"], "method": rec["method"], "expert": rec["expert"],
            "target_ratio": rec["target_ratio"], "achieved_ratio": rec["achieved_ratio"],
            "ffn_widths": rec["ffn_widths"], "dense_ffn_width": rec["dense_ffn_width"],
            "num_heads": rec.get("num_heads"), "params": count_params(lm.model),
            "ffn_params": ffn_params(lm.model, lm.adapter),
            "reload": "seap.load_model / seap's loader" if "per_layer_config" in data else "plain from_pretrained",
        }
    raise ArtifactError(f"{path} is neither a plan folder (plan.json) nor a pruned model folder (config.json)")


def evaluate(model: str | LoadedModel | None = None, *, plan: str | Path | Plan | None = None,
             experts: str = "task", config=None, out: str | Path | None = None, label: str | None = None,
             routed: str | Path | Router | None = None, extra_plans: Sequence[str | Path | Plan] = ()):
    """`seap eval`: a dense model, a pruned folder (as --model), or a base model plus a plan
    (with `routed`, the router picks every item's expert among the plans' experts)."""
    from .evaluation.runner import EvalConfig, evaluate_model, evaluate_plan, save_report
    from .griffin import GriffinConfig

    config = config or EvalConfig()
    lm = _load(model)
    dyn = GriffinConfig(config.griffin, shared=config.griffin_shared).label if config.griffin is not None else None
    if routed is not None:
        from .evaluation.routed import evaluate_routed

        if dyn:
            raise ConfigError("--griffin composes with one plan expert, not with --routed: drop one of them")
        if config.xsum:
            raise ConfigError("--xsum is not routed: summarise with one expert (--plan P --experts generic)")
        if plan is None:
            raise ConfigError("--routed needs the plan(s) whose experts the router picks: add --plan")
        report = evaluate_routed(lm, _plans([plan, *extra_plans]), _router(routed), config, label=label)
    elif plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        if dyn and label is None:
            label = f"{plan.meta['method']}@{plan.meta['target_ratio']:g} ({experts})+{dyn}"
        report = evaluate_plan(lm, plan, config, experts=experts, label=label)
    elif extra_plans:
        raise ConfigError("several plans are only used with --routed")
    else:
        record = getattr(lm.model.config, "seap_pruning", None)
        default = f"{record['method']} {record['expert']} @{record['target_ratio']:g}" if record else "dense"
        default = f"{default}+{dyn}" if dyn and record else dyn or default
        report = evaluate_model(lm, config, label=label or default)
    if out:
        report.meta["files"] = save_report([report], out)
    return report


def benchmark(model: str | LoadedModel | None = None, *, compare: Sequence[str] = (),
              plans: Sequence[str] = (), config=None, out: str | Path | None = None,
              griffin: Sequence[float] = (), prompts: str | None = None, data_dir: str | Path | None = None,
              griffin_shared: bool = False):
    """`seap bench`: the dense model and each pruned folder / plan expert (and GRIFFIN at each
    density on the base model; `griffin_shared`: one expert per batch), timed in one process.
    `prompts` (a task, the embedded corpus or a .txt/.jsonl file, as for calibration) gives real
    prompt texts instead of random tokens."""
    from .bench import bench_models, speed_markdown, speed_table
    from .evaluation.runner import sliced_copy
    from .griffin import GriffinConfig

    lm = _load(model)
    models = {"dense": lm}
    for path in compare:
        models[Path(path).name or str(path)] = load_model(str(path))
    for spec in plans:
        folder, _, expert = str(spec).partition(":")
        p = Plan.load(folder)
        check_fingerprint(p.meta["fingerprint"], lm.model, lm.adapter)
        name, _ = p.expert(expert or None)
        models[f"{p.meta['method']}@{p.meta['target_ratio']:g}:{name}"] = sliced_copy(lm, p, name)
    dynamic = {}
    if griffin_shared and not griffin:
        raise ConfigError("--griffin-shared needs --griffin DENSITY")
    for d in griffin:
        g = GriffinConfig(density=d, shared=griffin_shared)
        models[g.label], dynamic[g.label] = lm, g
    texts = resolve_corpus(prompts, data_dir=data_dir).texts if prompts else None
    speeds = bench_models(models, config, griffin=dynamic, texts=texts)
    rows = speed_table(speeds, "dense")
    if out:
        cfg = {**(config.__dict__ if config is not None else {}), "prompts": prompts or "random tokens"}
        write_json(Path(out) / "bench.json", {"config": cfg, "models": {n: s.to_dict() for n, s in speeds.items()},
                                              "rows": rows})
        write_text(Path(out) / "bench.md", "# seap bench\n\n" + speed_markdown(rows))
    return rows


# -- routing ------------------------------------------------------------------------------------
def _plans(plans: Sequence[str | Path | Plan]) -> list[Plan]:
    if not plans:
        raise ConfigError("give at least one plan (--plan)")
    return [p if isinstance(p, Plan) else Plan.load(p) for p in plans]


def _router(router: str | Path | Router) -> Router:
    return router if isinstance(router, Router) else Router.load(router)


def fit_router(model: str | LoadedModel | None, plans: Sequence[str | Path | Plan], *,
               tasks: Sequence[str] | None = None, data_dir: str | Path | None = None, split: str | None = "train",
               config: RouterConfig | None = None, out: str | Path | None = None) -> Router:
    """`seap route fit`: a router over the plans' experts, saved beside the (first) plan by default."""
    from .experts import merge_experts
    from .router import fit_router as fit

    lm = _load(model)
    loaded = _plans(plans)
    experts, owner = merge_experts(loaded)
    for p in loaded:
        check_fingerprint(p.meta["fingerprint"], lm.model, lm.adapter)
    t0 = time.time()
    router = fit(lm, experts, config, data_dir=data_dir, split=split, tasks=tasks)
    router.meta["fit_seconds"] = round(time.time() - t0, 1)
    router.meta["plans"] = [str(p) for p in plans if not isinstance(p, Plan)]
    if out is None and not isinstance(plans[0], Plan):
        out = Path(plans[0]).parent / "router"
    if out is not None:
        router.save(out)
        router.meta["folder"] = str(out)
    return router


def evaluate_router(model: str | LoadedModel | None, router: str | Path | Router, *,
                    data_dir: str | Path | None = None, split: str | None = "validation", limit: int | None = None,
                    unknown: Sequence[str] = (), out: str | Path | None = None) -> RouterEval:
    """`seap route eval`: precision, recall, F1 and the confusion matrix on held-out prompts."""
    from .router import evaluate_router as run
    from .tasks import resolve_corpus

    lm = _load(model)
    r = _router(router)
    extra = {}
    for spec in unknown:
        c = resolve_corpus(spec, data_dir=data_dir, limit=limit)
        extra[spec] = list(c.prompts or c.texts)
    res = run(lm, r, data_dir=data_dir, split=split, limit=limit, unknown=extra)
    if out:
        out = Path(out)
        write_json(out / "route_eval.json", res.to_dict())
        write_text(out / "route_eval.md", "# seap route eval\n\n" + res.markdown())
        files = {"json": str(out / "route_eval.json"), "markdown": str(out / "route_eval.md")}
        try:
            from .plots import confusion_plot

            files["plot"] = str(confusion_plot(res, out / "confusion.png"))
        except ImportError:
            log.info("matplotlib is not installed: no confusion plot (pip install 'seap[plots]')")
        res.meta["files"] = files
    return res


def explain(model: str | LoadedModel | None, router: str | Path | Router, prompts: Sequence[str]) -> list[Route]:
    """`seap route explain`: the expert each prompt gets, with the class probabilities."""
    if not prompts:
        raise ConfigError("give at least one prompt to explain")
    lm = _load(model)
    return _router(router).route(lm, prompts)


def generate(model: str | LoadedModel | None, prompts: Sequence[str], *, plans: Sequence[str | Path | Plan] = (),
             router: str | Path | Router | None = None, expert: str | None = None,
             max_new_tokens: int = 64, griffin: float | None = None, stop: Sequence[str] = (),
             griffin_shared: bool = False) -> list[dict]:
    """`seap generate`: greedy continuations on the dense model, one expert, or routed experts;
    with `griffin`, per-prompt GRIFFIN experts at that density (within the plan's expert if given;
    `griffin_shared`: one expert for all the prompts, decoded as one batch)."""
    from .evaluation.runner import sliced_copy
    from .experts import MultiExpertModel
    from .griffin import GriffinConfig, cut_at_stop, generate_texts

    if not prompts:
        raise ConfigError("give at least one prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"max new tokens must be >= 1, got {max_new_tokens}")
    lm = _load(model)
    if griffin is not None:
        label = GriffinConfig(density=griffin, shared=griffin_shared).label
        if router is not None:
            raise ConfigError("--griffin composes with one plan expert (--plan [--expert]), not with --router")
        if plans:
            plan = _plans(plans)[0]
            check_fingerprint(plan.meta["fingerprint"], lm.model, lm.adapter)
            name, _ = plan.expert(expert)
            lm, label = sliced_copy(lm, plan, name), f"{name}+{label}"
        texts, out = generate_texts(lm, prompts, density=griffin, max_new_tokens=max_new_tokens, stop=stop,
                                    shared=griffin_shared)
        return [{"prompt": p, "expert": label, "text": t, "kept_fraction": round(out.kept_fraction, 4)}
                for p, t in zip(prompts, texts)]
    if griffin_shared:
        raise ConfigError("--griffin-shared needs --griffin DENSITY")
    if not plans:
        if router is not None or expert is not None:
            raise ConfigError("--router and --expert need the plan(s) their experts come from: add --plan")
        multi = None
    else:
        loaded = _plans(plans)
        r = _router(router) if router is not None else None
        if r is None and expert is None:
            expert = loaded[0].expert(None)[0]  # the plan's default expert
        multi = MultiExpertModel(lm, loaded, r, experts=None)
    if multi is None:
        from .experts import greedy_batch

        texts = greedy_batch(lm, prompts, max_new_tokens)
        return [{"prompt": p, "expert": "dense", "text": cut_at_stop(t, stop)} for p, t in zip(prompts, texts)]
    routes = multi.route(prompts) if expert is None else None
    texts, names = multi.generate(prompts, experts=[r.expert for r in routes] if routes else expert,
                                  max_new_tokens=max_new_tokens)
    texts = [cut_at_stop(t, stop) for t in texts]
    return [{"prompt": p, "expert": n, "text": t, **({"confidence": round(routes[i].confidence, 4),
                                                      "reason": routes[i].reason} if routes else {})}
            for i, (p, n, t) in enumerate(zip(prompts, names, texts))]

"""The Python API behind the CLI: collect -> plan -> slice -> save, with a summary."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Sequence

from ._io import write_json, write_text
from .errors import ArtifactError, ConfigError
from .inference.griffin import GriffinConfig
from .inference.router import Router, RouterConfig, RouterEval, Route
from .model.fingerprints import check_fingerprint
from .model.loading import LoadedModel, chat_prompts, check_prompts, use_or_open
from .model.pruned_folder import read_record
from .model.runtime import Runtime
from .pruning.plan import Plan
from .pruning.prune import DEFAULT_TASKS, CalibrationData, PruneResult, apply, collect, prune
from .pruning.surgery import plan_and_expert, sliced
from .tasks import resolve_corpus

__all__ = ["DEFAULT_TASKS", "CalibrationData", "PruneResult", "apply", "benchmark", "benchmark_gguf", "collect",
           "evaluate", "evaluate_router", "explain", "export", "fit_router", "generate", "info", "load", "prune"]

log = logging.getLogger(__name__)


def _load(model: str | LoadedModel | None, runtime: Runtime | None = None) -> LoadedModel:
    """A model in memory, placed as `runtime` says (device, dtype, device_map)."""
    return use_or_open(model, runtime)


def load(model: str | Path | None = None, *, runtime: Runtime | None = None) -> LoadedModel:
    """A model and its tokenizer in memory: a bundled name (default smollm2-135m), a hub id, a Hugging Face
    or seap-pruned folder, or the output folder of `seap prune` (its pruned model). `runtime`: device,
    dtype, device_map (default: the best device, the checkpoint's dtype there)."""
    return _load(None if model is None else str(model), runtime)


def _expert_info(ex) -> dict:
    """What `seap info` shows of an expert: widths, ratios, and the reconstruction in brief."""
    from .pruning.refit_pass import error_summary

    out = {"ffn_widths": ex.widths(), **{k: v for k, v in ex.stats.items() if k != "reconstruction"}}
    rec = ex.stats.get("reconstruction")
    if rec:
        errors = error_summary(ex)
        out["reconstruction"] = {k: rec[k] for k in ("mode", "ridge", "centered", "choice", "tokens") if k in rec}
        out["reconstruction"]["ffn_output_error_vs_plain_cut"] = {k: round(v, 4) for k, v in errors.items()}
    return out


def info(path: str | Path) -> dict:
    """What a plan folder, a pruned model folder or a `seap prune --out` folder (both) contains."""
    from .outputs import check_folder, check_prune_output

    path = Path(path)
    if not (path / "plan.json").is_file() and not (path / "config.json").is_file() and path.is_dir():
        check_prune_output(path)  # refused when incomplete or mixed (its manifest, or its two parts)
    else:
        check_folder(path)
    return _describe(path)


def _describe(path: Path) -> dict:
    parts = {k: path / k for k, marker in (("plan", "plan.json"), ("model", "config.json"))
             if (path / k / marker).is_file() and not (path / marker).is_file()}
    if parts:
        return {"kind": "prune output", "folder": str(path), **{k: _describe(p) for k, p in parts.items()}}
    if (path / "plan.json").is_file():
        plan = Plan.load(path)
        arch = plan.meta.fingerprint["arch"]
        return {
            "kind": "plan", "base_model": plan.meta.base_model, "method": plan.meta.method,
            "score": plan.meta.prune_config.score.name, "allocation": plan.meta.prune_config.allocation.name,
            "target_ratio": plan.meta.target_ratio, "head_unit": plan.head_unit,
            "dense_ffn_widths": arch["d_ff"], "default_expert": plan.meta.default_expert,
            "experts": {n: _expert_info(e) for n, e in plan.experts.items()},
        }
    if (path / "config.json").is_file():
        from .model.adapters import adapter_for_config
        from .model.checkpoint import Checkpoint
        from .model.runtime import dtype_name

        data = read_record(path)
        rec = data["seap_pruning"]
        ckpt = Checkpoint.open(path)  # counted from the shard headers: nothing is loaded
        adapter = adapter_for_config(SimpleNamespace(model_type=data.get("model_type")))
        ffn_parts = tuple(f".{n}." for n in (*adapter.ffn_in_names, adapter.ffn_out_name))
        return {
            "kind": "pruned model", "base_model": rec["base_model"], "method": rec["method"], "expert": rec["expert"],
            "target_ratio": rec["target_ratio"], "achieved_ratio": rec["achieved_ratio"],
            "ffn_widths": rec["ffn_widths"], "dense_ffn_width": rec["dense_ffn_width"],
            "num_heads": rec.get("num_heads"), "params": ckpt.n_params,
            "ffn_params": sum(t.numel for n, t in ckpt.tensors.items() if any(p in n for p in ffn_parts)),
            "dtype": dtype_name(ckpt.dtype), "bytes": ckpt.nbytes,
            "shards": len({t.file for t in ckpt.tensors.values()}),
            "reload": "seap.load_model / seap's loader" if "per_layer_config" in data else "plain from_pretrained",
        }
    raise ArtifactError(f"{path} is neither a plan folder (plan.json), a pruned model folder (config.json) nor the "
                        "output folder of `seap prune` (plan/, model/): give one of those")


def evaluate(model: str | LoadedModel | None = None, *, plan: str | Path | Plan | None = None,
             experts: str = "task", config=None, out: str | Path | None = None, label: str | None = None,
             routed: str | Path | Router | None = None, extra_plans: Sequence[str | Path | Plan] = (),
             runtime: Runtime | None = None):
    """`seap eval`: a dense model, a pruned folder (as --model), or a base model plus a plan
    (with `routed`, the router picks every item's expert among the plans' experts)."""
    from .evaluation.runner import EvalConfig, evaluate_model, evaluate_plan, save_report

    config = config or EvalConfig()
    lm = _load(model, runtime)
    dyn = config.griffin.label if config.griffin is not None else None
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
            label = f"{plan.meta.label} ({experts})+{dyn}"
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
              griffin: Sequence[float | GriffinConfig] = (), prompts: str | None = None,
              data_dir: str | Path | None = None, runtime: Runtime | None = None, chat: bool = False):
    """`seap bench`: the dense model and each pruned folder / plan expert (and GRIFFIN on the base model
    as each GriffinConfig says, or at each density with its defaults), timed in one process.
    `prompts` (a task, the embedded corpus or a .txt/.jsonl file, as for calibration) gives real
    prompt texts instead of random tokens; `chat` wraps them in the chat template."""
    from .evaluation.bench import bench_models, speed_markdown, speed_table
    lm = _load(model, runtime)
    models = {"dense": lm}
    for path in compare:
        models[Path(path).name or str(path)] = _load(str(path), runtime)
    for spec in plans:
        p, expert = plan_and_expert(spec)
        name, _ = p.expert(expert)
        models[f"{p.meta.label}:{name}"] = sliced(lm, p, name)
    dynamic = {}
    for d in griffin:
        g = d if isinstance(d, GriffinConfig) else GriffinConfig(density=d)
        models[g.label], dynamic[g.label] = lm, g
    texts = resolve_corpus(prompts, data_dir=data_dir).texts if prompts else None
    if chat and texts is None:
        raise ConfigError("--chat wraps real prompt texts in the chat template: give --prompts")
    speeds = bench_models(models, config, griffin=dynamic, texts=texts, chat=chat)
    rows = speed_table(speeds, "dense")
    if out:
        cfg = {**(config.__dict__ if config is not None else {}), "prompts": prompts or "random tokens",
               "chat_template": chat}
        write_json(Path(out) / "bench.json", {"config": cfg, "models": {n: s.to_dict() for n, s in speeds.items()},
                                              "rows": rows})
        write_text(Path(out) / "bench.md", "# seap bench\n\n" + speed_markdown(rows))
    return rows


def benchmark_gguf(model: str | LoadedModel | None = None, **kwargs) -> list[dict]:
    """`seap bench --backend llamacpp`: each model exported to GGUF and timed by llama.cpp at batch 1
    (seap.export.benchmark_gguf's options: compare, plans, quant, prompt_len, gen_len, warmup, repeats, out)."""
    from .export import benchmark_gguf as run

    return run(model, **kwargs)


def export(model: str | LoadedModel | None, out: str | Path, **kwargs) -> dict:
    """`seap export`: a pruned folder (or a base model plus a plan expert) as GGUF for llama.cpp or as a
    vLLM folder (seap.export.export_model's options: fmt, plan, expert, out_type, check, ...)."""
    from .export import export_model

    return export_model(model, out, **kwargs)


# -- routing ------------------------------------------------------------------------------------
def _plans(plans: Sequence[str | Path | Plan]) -> list[Plan]:
    if not plans:
        raise ConfigError("give at least one plan (--plan)")
    return [p if isinstance(p, Plan) else Plan.load(p) for p in plans]


def _router(router: str | Path | Router) -> Router:
    return router if isinstance(router, Router) else Router.load(router)


def fit_router(model: str | LoadedModel | None, plans: Sequence[str | Path | Plan], *,
               tasks: Sequence[str] | None = None, data_dir: str | Path | None = None, split: str | None = "train",
               config: RouterConfig | None = None, out: str | Path | None = None,
               runtime: Runtime | None = None, wait: bool = False) -> Router:
    """`seap route fit`: a router over the plans' experts, saved beside the (first) plan by default, as
    one artifact (seap.outputs; `wait`: wait for another run writing `out` instead of refusing)."""
    from .inference.experts import merge_experts
    from .inference.router import fit_router as fit
    from .outputs import output_folder

    loaded = _plans(plans)  # bad plans are refused before the model loads
    experts, owner = merge_experts(loaded)
    if out is None and not isinstance(plans[0], Plan):
        out = Path(plans[0]).parent / "router"
    with output_folder(out, "seap route fit", None, wait=wait) as output:
        lm = _load(model, runtime)
        for p in loaded:
            check_fingerprint(p.meta.fingerprint, lm.model, lm.adapter)
        t0 = time.time()
        router = fit(lm, experts, config, data_dir=data_dir, split=split, tasks=tasks)
        router.meta["fit_seconds"] = round(time.time() - t0, 1)
        router.meta["plans"] = [str(p) for p in plans if not isinstance(p, Plan)]
        if out is not None:
            output.begin()
            router.save(out)
            output.commit()
            router.meta["folder"] = str(out)
    return router


def evaluate_router(model: str | LoadedModel | None, router: str | Path | Router, *,
                    data_dir: str | Path | None = None, split: str | None = "validation", limit: int | None = None,
                    unknown: Sequence[str] = (), out: str | Path | None = None,
                    runtime: Runtime | None = None) -> RouterEval:
    """`seap route eval`: precision, recall, F1 and the confusion matrix on held-out prompts."""
    from .inference.router import evaluate_router as run
    from .tasks import resolve_corpus

    lm = _load(model, runtime)
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
            from .evaluation.plots import confusion_plot

            files["plot"] = str(confusion_plot(res, out / "confusion.png"))
        except ImportError:
            log.info("matplotlib is not installed: no confusion plot (pip install 'seap[plots]')")
        res.meta["files"] = files
    return res


def explain(model: str | LoadedModel | None, router: str | Path | Router, prompts: Sequence[str], *,
            runtime: Runtime | None = None) -> list[Route]:
    """`seap route explain`: the expert each prompt gets, with the class probabilities."""
    if not prompts:
        raise ConfigError("give at least one prompt to explain")
    prompts = check_prompts(prompts)
    lm = _load(model, runtime)
    return _router(router).route(lm, prompts)


def generate(model: str | LoadedModel | None, prompts: Sequence[str], *, plans: Sequence[str | Path | Plan] = (),
             router: str | Path | Router | None = None, expert: str | None = None,
             max_new_tokens: int = 64, griffin: float | GriffinConfig | None = None, stop: Sequence[str] = (),
             runtime: Runtime | None = None, chat: bool | None = None) -> list[dict]:
    """`seap generate`: greedy continuations on the dense model, one expert, or routed experts;
    with `griffin`, per-prompt GRIFFIN experts at that density or as that GriffinConfig says (within the
    plan's expert if given; GriffinConfig(shared=True): one expert for all the prompts, decoded as one batch). `chat`: each prompt as a
    user turn of the tokenizer's chat template (None: when the model has one; every row says).

    Every path decodes with seap.inference.decoding.greedy and gives rows of one shape: prompt, expert, text,
    chat_template, kept_fraction (the share of the model's FFN neurons the row ran through: 1.0 when
    nothing is dropped; GRIFFIN's within a plan expert counts the expert's width), confidence and
    reason (the router's; None when not routed)."""
    from .inference.decoding import generate_texts
    from .inference.experts import MultiExpertModel
    from .inference.griffin import griffin_selection

    if not prompts:
        raise ConfigError("give at least one prompt")
    prompts = check_prompts(prompts)  # before the model loads
    if max_new_tokens < 1:
        raise ConfigError(f"max new tokens must be >= 1, got {max_new_tokens}")
    lm = _load(model, runtime)
    inputs, templated = chat_prompts(lm.tokenizer, prompts, chat)
    decode = dict(max_new_tokens=max_new_tokens, stop=stop, special_tokens=not templated)
    routes: list[Route] | None = None
    if griffin is not None:
        g = griffin if isinstance(griffin, GriffinConfig) else GriffinConfig(density=griffin)
        label = g.label
        if router is not None:
            raise ConfigError("--griffin composes with one plan expert (--plan [--expert]), not with --router")
        if plans:
            plan = _plans(plans)[0]
            name, _ = plan.expert(expert)
            lm, label = sliced(lm, plan, name), f"{name}+{label}"
        texts, out = generate_texts(lm, inputs, selection=griffin_selection(lm, g), **decode)
        names, kept = [label] * len(prompts), [out.stats["kept_fraction"]] * len(prompts)
    elif not plans:
        if router is not None or expert is not None:
            raise ConfigError("--router and --expert need the plan(s) their experts come from: add --plan")
        texts, _ = generate_texts(lm, inputs, **decode)
        names, kept = ["dense"] * len(prompts), [1.0] * len(prompts)
    else:
        loaded = _plans(plans)
        r = _router(router) if router is not None else None
        if r is None and expert is None:
            expert = loaded[0].expert(None)[0]  # the plan's default expert
        multi = MultiExpertModel(lm, loaded, r, experts=None)
        routes = multi.route(prompts) if expert is None else None  # the router reads the bare prompt
        texts, names = multi.generate(inputs, experts=[x.expert for x in routes] if routes else expert, **decode)
        kept = [multi.kept_fraction(n) for n in names]
    return [{"prompt": p, "expert": n, "text": t, "chat_template": templated, "kept_fraction": round(k, 4),
             "confidence": None if routes is None else round(routes[i].confidence, 4),
             "reason": None if routes is None else routes[i].reason}
            for i, (p, n, t, k) in enumerate(zip(prompts, names, texts, kept))]

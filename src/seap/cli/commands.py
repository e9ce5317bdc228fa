"""`seap` command line: a thin layer over seap.api. Each command is a handler that turns its flags
into configs and calls one seap.api function, and a renderer that prints the result; the
arguments are in seap.cli.args. Errors print one line and exit 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..config import DEFAULT_TASKS, CalibrationData, PruneConfig
from ..errors import ConfigError, SeapError
from ..inference.griffin import GriffinConfig
from ..model.runtime import runtime_from_args
from .args import as_flags, build_parser


def _calibration(args) -> CalibrationData:
    return CalibrationData(tuple(args.tasks or DEFAULT_TASKS), data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.batch_size, max_length=args.max_length,
                           stats_dir=getattr(args, "stats_dir", None))


def _griffin(args, density: float | None):
    """The GriffinConfig the GRIFFIN options describe, at `density` (None: no GRIFFIN)."""
    if density is None:
        if args.griffin_shared:
            raise ConfigError("--griffin-shared needs --griffin DENSITY")
        return None
    return GriffinConfig(density=density, shared=args.griffin_shared, short=args.griffin_short,
                         prior_tokens=args.griffin_prior_tokens)


def _print_result(res, out) -> None:
    from ..calibration import distributed

    if not distributed.is_main():  # under torchrun, rank 0 reports
        return
    s = res.summary()
    print(f"pruned {s['base_model']} with {s['method']} (expert {s['expert']}) in {s['seconds']:.0f}s")
    print(f"  prunable parameters removed: {s['achieved_ratio']:.2%} (target {s['target_ratio']:.2%})")
    print(f"  total parameters: {s['params_before']:,} -> {s['params_after']:,} "
          f"({s['total_reduction']:.1%} fewer)")
    print(f"  FFN parameters:   {s['ffn_params_before']:,} -> {s['ffn_params_after']:,}")
    w = s["ffn_widths"]
    print(f"  FFN widths: {w[0] if len(set(w)) == 1 else f'{min(w)}..{max(w)} per layer'}"
          + (f"; heads kept per layer {s['heads_kept']}" if s.get("heads_kept") else ""))
    cal = s.get("calibration") or {}
    if cal.get("tokens_per_process"):
        tok = cal["tokens_per_process"]
        per = f" ({' + '.join(f'{t:,}' for t in tok)} on {len(tok)} processes)" if len(tok) > 1 else ""
        resumed = f"; resumed at layer {cal['resumed_from_layer']}" if cal.get("resumed_from_layer") else ""
        print(f"  calibration: {cal['passes']} pass over the model, {sum(tok):,} tokens{per}{resumed}")
    for name, c in (cal.get("corpora") or {}).items():
        print(f"    corpus {name}: {c['source']}, {c['texts']:,} texts, {c['tokens']:,} tokens")
    rec = s.get("reconstruction") or {}
    if rec:
        choice = "OBS choice" if rec["choice"] == "obs" else "the score's channels"
        print(f"  reconstruction: least-squares {rec['mode']} of the output linears ({choice}, ridge {rec['ridge']:g}) "
              f"on {rec['tokens']:,} tokens")
    print(f"  seconds per stage: {', '.join(f'{k} {v:.0f}' for k, v in s['stage_seconds'].items())}")
    for k, v in s["files"].items():
        print(f"  {k}: {v}")
    if out:
        print(f"  summary: {Path(out) / 'summary.md'}")


def _print_export(rep: dict) -> None:
    w = rep["ffn_widths"]
    widths = f"{w[0]} in all {len(w)} layers" if len(set(w)) == 1 else f"{min(w)}..{max(w)} per layer"
    if rep["format"] == "gguf":
        types = ", ".join(f"{n} {k}" for k, n in rep["tensor_types"].items())
        print(f"wrote {rep['path']} ({rep['file_bytes'] / 2**20:.1f} MB, llama.cpp architecture {rep['arch']}, "
              f"{rep['out_type']}) in {rep['seconds']:.0f}s")
        print(f"  FFN widths: {widths}; tensors: {types}; tokenizer: {rep['tokenizer_source']}")
        if "check" in rep:
            c = rep["check"]
            print(f"  llama.cpp vs transformers on {c['positions']} tokens of {c['text']}: top-1 agreement "
                  f"{c['top1_agreement']:.2%}, max |logit diff| {c['max_abs_diff']:.2e} (logits up to "
                  f"{c['max_abs_logit']:.1f}); report: {Path(rep['path']).with_suffix('.json')}")
    else:
        how = ("DeciLM block configs (serve with trust_remote_code=True)" if rep["layout"] == "decilm"
               else f"a plain {rep['layout']} folder")
        print(f"wrote {rep['path']}: {how} in {rep['seconds']:.0f}s")
        print(f"  FFN widths: {widths}; tensor parallel checked for {rep['tensor_parallel']} GPU(s)")


def _read_prompts(path: str) -> list[str]:
    from ..errors import DataError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read prompts from {path}: {err}") from None
    if path.endswith(".jsonl"):
        try:
            return [json.loads(line)["prompt"] for line in lines if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}: every line must be a JSON object with a 'prompt' string") from None
    return [line for line in lines if line.strip()]


def _route(api, args, rt) -> None:
    from ..inference.router import RouterConfig

    if args.route_cmd == "fit":
        cfg = RouterConfig(threshold=args.threshold, limit=args.limit,
                           background=tuple(args.background or RouterConfig.background))
        router = api.fit_router(args.model, args.plan, tasks=args.tasks, data_dir=args.data_dir,
                                     split=args.split, config=cfg, out=args.out, runtime=rt, wait=args.wait)
        counts = router.meta["train_counts"]
        print(f"router over {len(router.classes)} classes fitted in {router.meta['fit_seconds']:.0f}s "
              f"(train accuracy {router.meta['train_accuracy']:.3f})")
        for c in router.classes:
            print(f"  {c}: {counts[c]} prompts -> expert {router.experts[c]}")
        print(f"  threshold {router.threshold}: lower top probability -> generic; saved to {router.meta['folder']}")
    elif args.route_cmd == "eval":
        res = api.evaluate_router(args.model, args.router, data_dir=args.data_dir, split=args.split,
                                       limit=args.limit, unknown=args.unknown, out=args.out, runtime=rt)
        print(res.markdown(), end="")
        print("results: " + ", ".join(res.meta.get("files", {}).values()))
    else:
        routes = api.explain(args.model, args.router, args.prompts, runtime=rt)
        if args.json:
            print(json.dumps([{"prompt": p, **r.__dict__} for p, r in zip(args.prompts, routes)], indent=2))
            return
        for p, r in zip(args.prompts, routes):
            top = sorted(r.probs.items(), key=lambda kv: -kv[1])[:4]
            print(f"{p[:60]!r} -> {r.expert} ({r.reason}, p={r.confidence:.2f}); "
                  + ", ".join(f"{c} {v:.2f}" for c, v in top))


# -- commands: flags -> configs -> one api call -> printed result ------------------------------
def _collect(api, args, rt) -> None:
    stats = api.collect(args.model, _calibration(args), args.out, heads=args.heads, runtime=rt, wait=args.wait)
    for task, s in stats.items():
        print(f"{task}: {s.meta.get('n_texts')} texts, {s.n_tokens:,} tokens -> {args.out}")


def _prune(api, args, rt) -> None:
    from ..analyze.schedule import load_schedule

    if args.allocation == "logistic-fitted" and not args.schedule:  # the name of a logistic with --schedule
        raise ConfigError("--allocation logistic-fitted needs the fitted schedule: run `seap analyze "
                          "sensitivity --out DIR` and pass --schedule DIR/sensitivity.json")
    cfg = PruneConfig.from_method(
        args.method, ratio=args.ratio, score=args.score, heads=args.heads,
        allocation=None if args.allocation == "logistic-fitted" else args.allocation,
        schedule=load_schedule(args.schedule) if args.schedule else None,
        bias_compensation=args.bias_compensation, protect_first=args.protect_first,
        protect_last=args.protect_last, k=args.k, x0=args.x0, rho_max=args.rho_max, robust=args.robust,
        multiple=args.multiple, seed=args.seed, reconstruct=args.reconstruct, ridge=args.ridge,
        refit_bias=args.refit_bias, refit_choice=args.refit_choice, obs_pool=args.obs_pool)
    res = api.prune(args.model, cfg, _calibration(args), args.out, expert=args.expert, runtime=rt,
                         shard_size=args.shard_size, wait=args.wait)
    _print_result(res, args.out)


def _apply(api, args, rt) -> None:
    _print_result(api.apply(args.model, args.plan, expert=args.expert, out=args.out, runtime=rt,
                                 shard_size=args.shard_size, wait=args.wait), None)


def _eval(api, args, rt) -> None:
    from ..evaluation.runner import EvalConfig, markdown_table

    cfg = EvalConfig(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                     data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                     ppl_window=args.ppl_window, ppl_windows=args.ppl_windows, token_ppl=not args.no_ppl,
                     word_ppl_docs=None if args.word_ppl_docs == -1 else args.word_ppl_docs,
                     xsum=args.xsum, xsum_shots=args.xsum_shots, gen_batch_size=args.gen_batch_size,
                     griffin=_griffin(args, args.griffin), chat=bool(args.chat))
    plans = args.plan or [None]
    report = api.evaluate(args.model, plan=plans[0], extra_plans=plans[1:], experts=args.experts,
                               config=cfg, out=args.out, routed=args.routed, runtime=rt)
    print(markdown_table([report]), end="")
    print(f"results: {Path(args.out) / 'eval.json'}, {Path(args.out) / 'eval.md'}")


def _bench(api, args, rt) -> None:
    from ..evaluation.bench import BenchConfig, speed_markdown
    from ..export.llamacpp import speed_markdown as gguf_markdown

    if args.backend == "llamacpp":
        if args.griffin or args.griffin_shared or (args.batch_sizes and set(args.batch_sizes) != {1}):
            raise ConfigError("--backend llamacpp times static models at batch 1: drop --griffin and --batch")
        rows = api.benchmark_gguf(args.model, compare=args.compare, plans=args.plan, quant=args.quant,
                                       prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=args.warmup,
                                       repeats=args.repeats, out=args.out, runtime=rt)
        print(gguf_markdown(rows), end="")
    else:
        griffin = [_griffin(args, d) for d in args.griffin] if args.griffin else _griffin(args, None) or []
        cfg = BenchConfig(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_sizes=tuple(args.batch_sizes or (1, 8)),
                          warmup=args.warmup, repeats=args.repeats, decode_path=args.decode_path)
        rows = api.benchmark(args.model, compare=args.compare, plans=args.plan, config=cfg, out=args.out,
                                  griffin=griffin, prompts=args.prompts,
                                  data_dir=args.data_dir, runtime=rt, chat=bool(args.chat))
        print(speed_markdown(rows), end="")
    print(f"results: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}")


def _export(api, args, rt) -> None:
    _print_export(api.export(args.model, args.out, fmt=args.fmt, plan=args.plan, expert=args.expert,
                                  out_type=args.out_type, tokenizer_from=args.tokenizer_from,
                                  tensor_parallel=args.tensor_parallel, check=args.check, data_dir=args.data_dir,
                                  runtime=rt, wait=args.wait))


def _analyze(api, args, rt) -> None:
    from ..analyze.commands import run

    run(args, rt)


def _generate(api, args, rt) -> None:
    prompts = list(args.prompts) + (_read_prompts(args.file) if args.file else [])
    rows = api.generate(args.model, prompts, plans=args.plan, router=args.router, expert=args.expert,
                             max_new_tokens=args.max_new_tokens, griffin=_griffin(args, args.griffin),
                             stop=args.stop, runtime=rt, chat=args.chat)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        notes = [f"FFN kept {100 * row['kept_fraction']:.0f}%"] if row["kept_fraction"] < 1 else []
        if row["confidence"] is not None:
            notes.append(f"routed: {row['reason']}, p={row['confidence']:.2f}")
        extra = f" ({'; '.join(notes)})" if notes else ""
        print(f"--- [{row['expert']}]{extra} {row['prompt']!r}\n{row['text']}")


def _info(api, args, rt) -> None:
    data = api.info(args.path)
    if args.json:
        print(json.dumps(data, indent=2))
        return
    for k, v in data.items():
        if isinstance(v, dict) and "kind" in v:  # a prune output: its plan and its model
            print(f"{k}:" + "".join(f"\n  {kk}: {vv}" for kk, vv in v.items()))
        else:
            print(f"{k}: {v}")


COMMANDS = {"collect": _collect, "prune": _prune, "apply": _apply, "eval": _eval, "bench": _bench,
            "export": _export, "route": _route, "analyze": _analyze, "generate": _generate, "info": _info}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from .. import api

        COMMANDS[args.cmd](api, args, runtime_from_args(args))
    except SeapError as err:
        print(f"seap: error: {as_flags(str(err), parser, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seap: interrupted: nothing half-written is left under its final name, and an output folder it "
              "had begun is marked incomplete; run the command again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

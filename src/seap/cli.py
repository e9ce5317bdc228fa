"""`seap` command line: a thin layer over seap.pipeline. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .bench import DECODE_PATHS
from .config import DEFAULT_TASKS, HEAD_MODES, PRESETS, RECONSTRUCT_MODES, REFIT_CHOICES, CalibrationData, PruneConfig
from .tasks import ACCURACY_TASKS, SUITE, TASK_NAMES
from .export.gguf import OUT_TYPES
from .griffin import DEFAULT_SHORT, SHORT_MODES, GriffinConfig
from .errors import ConfigError, SeapError
from .runtime import add_runtime_args, runtime_from_args


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="bundled name (smollm2-135m [default], gemma3-270m), a Hugging "
                   "Face id, a local folder or a .gguf file")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", dest="tasks", action="append", default=None,
                   help=f"task corpus (repeatable): {', '.join(TASK_NAMES)}; default / default:<family> (embedded); "
                        "or a .txt/.jsonl file. Default: the embedded corpus")
    p.add_argument("--data-dir", default=None, help="local data folder laid out as <task>/<split>.parquet "
                   "(e.g. ../shared/data); without it tasks load from the Hugging Face hub")
    p.add_argument("--limit", type=int, default=None, help="calibration examples per task (seeded subset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="tokens per calibration text")


def _calibration(args) -> CalibrationData:
    return CalibrationData(tuple(args.tasks or DEFAULT_TASKS), data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.batch_size, max_length=args.max_length,
                           stats_dir=getattr(args, "stats_dir", None))


def _chat_args(p: argparse.ArgumentParser, chat_help: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help=chat_help)
    g.add_argument("--raw", dest="chat", action="store_false", help="the prompt text as it is, no chat template")


def _griffin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--griffin-shared", action="store_true", help=GRIFFIN_SHARED_HELP)
    p.add_argument("--griffin-short", default=DEFAULT_SHORT, choices=SHORT_MODES,
                   help="with --griffin, short prompts: prior (default: the prompt's statistic plus the model's "
                        "generic one, worth --griffin-prior-tokens tokens), density (keep more neurons the "
                        "shorter the prompt), none (the paper's pure GRIFFIN)")
    p.add_argument("--griffin-prior-tokens", type=float, default=64.0, metavar="N0",
                   help="weight of the short-prompt fix in prompt tokens (default 64)")


def _griffin(args, density: float | None):
    """The GriffinConfig the GRIFFIN options describe, at `density` (None: no GRIFFIN)."""
    if density is None:
        if args.griffin_shared:
            raise ConfigError("--griffin-shared needs --griffin DENSITY")
        return None
    return GriffinConfig(density=density, shared=args.griffin_shared, short=args.griffin_short,
                         prior_tokens=args.griffin_prior_tokens)


GRIFFIN_SHARED_HELP = ("with --griffin: one expert per batch (top k of the pooled statistic) instead of one per "
                       "prompt; faster decoding at batch > 1, and a prompt no longer gets exactly its own experts")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seap", description="Training-free pruning of LLM feed-forward experts.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("collect", help="activation statistics of task corpora")
    _model_args(p)
    add_runtime_args(p, load=True)
    _data_args(p)
    p.add_argument("--heads", action="store_true", help="also collect attention-output statistics")
    p.add_argument("--out", default="seap-stats", help="folder for <task>.safetensors")

    p = sub.add_parser("prune", help="statistics -> plan -> pruned model, in one command")
    _model_args(p)
    add_runtime_args(p, load=True)
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of the pruned model (e.g. 2GB)")
    _data_args(p)
    p.add_argument("--method", default="seap", choices=list(PRESETS))
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable parameters to remove (0, 1)")
    p.add_argument("--score", default=None, help="override: wifv, wifn, wanda_sp, magnitude, random")
    p.add_argument("--allocation", default=None, help="override: uniform, logistic, adaptive, logistic-fitted "
                   "(with --schedule)")
    p.add_argument("--schedule", default=None, help="sensitivity.json of `seap analyze sensitivity`: the logistic "
                   "schedule with its fitted k, x0 and dense layers (--allocation logistic-fitted names this)")
    p.add_argument("--heads", default=None, choices=HEAD_MODES,
                   help="auto (default): heads for multi-head attention, FFN only for GQA")
    bc = p.add_mutually_exclusive_group()
    bc.add_argument("--bias-compensation", dest="bias_compensation", action="store_true", default=None)
    bc.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false")
    p.add_argument("--protect-first", type=int, default=None)
    p.add_argument("--protect-last", type=int, default=None)
    p.add_argument("--k", type=float, default=None, help="logistic steepness")
    p.add_argument("--x0", type=float, default=None, help="logistic midpoint (relative depth)")
    p.add_argument("--rho-max", type=float, default=None)
    p.add_argument("--robust", action="store_true", default=None, help="adaptive: median/IQR standardisation")
    p.add_argument("--multiple", type=int, default=None,
                   help="round widths to a multiple (default 32: Q8_0 GGUF blocks and GPU tiles; 256 for K-quants; "
                        "1 for exact widths); the ratio is still met model-wide")
    p.add_argument("--reconstruct", default=None, choices=RECONSTRUCT_MODES,
                   help="refit the kept columns of each output linear by least squares on the calibration "
                        "activations (refit), each layer on the pruned layers' outputs (sequential), or not (none)")
    p.add_argument("--refit-choice", default=None, choices=REFIT_CHOICES,
                   help="with reconstruction: choose each layer's FFN channels for the refit (obs: greedy "
                        "optimal-brain-surgeon on the layer's Gram matrix, same widths) or keep the score's (score)")
    p.add_argument("--ridge", type=float, default=None, help="reconstruction: ridge term relative to the kept "
                   "channels' mean variance (default 0.01)")
    rb = p.add_mutually_exclusive_group()
    rb.add_argument("--refit-bias", dest="refit_bias", action="store_true", default=None,
                    help="reconstruction fits an FFN output bias too (default where the architecture has one: "
                         "Llama, OPT)")
    rb.add_argument("--no-refit-bias", dest="refit_bias", action="store_false",
                    help="weights only: for Gemma 3 GGUF and vLLM exports, whose architectures have no FFN bias")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--expert", default=None, help="which expert of the plan to materialise")
    p.add_argument("--stats-dir", default=None, help="reuse/store statistics here (default <out>/stats)")
    p.add_argument("--out", default="seap-out", help="output folder: plan/, model/, stats/, summary.*")

    p = sub.add_parser("apply", help="apply a saved plan to its base model")
    _model_args(p)
    add_runtime_args(p, load=True)
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of the pruned model (e.g. 2GB)")
    p.add_argument("--plan", required=True)
    p.add_argument("--expert", default=None)
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="zero-shot accuracy (lm-eval) and perplexity of a model, pruned folder or plan")
    _model_args(p)
    add_runtime_args(p, device_map=True)
    p.add_argument("--plan", action="append", default=None,
                   help="plan folder: evaluate its experts on --model (the plan's base); repeatable with --routed")
    p.add_argument("--routed", default=None, metavar="ROUTER",
                   help="router folder (seap route fit): the router picks each item's expert instead of the oracle")
    p.add_argument("--experts", default="task", help="with --plan: 'task' (each task its own expert, the "
                   "paper's protocol), 'generic', or an expert name for every task")
    p.add_argument("--tasks", default=",".join(SUITE),
                   help=f"comma-separated, from {','.join(ACCURACY_TASKS)}; empty for perplexity only")
    p.add_argument("--data-dir", default=None, help="local copies in the hub row layout, <task>/<split>.parquet "
                   "(e.g. ../shared/data); without it lm-eval reads the hub")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (as lm_eval --limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-window", type=int, default=1024, help="token-perplexity window length (tokens)")
    p.add_argument("--ppl-windows", type=int, default=None, help="use only the first N windows")
    p.add_argument("--no-ppl", action="store_true", help="skip token perplexity on WikiText-2")
    p.add_argument("--word-ppl-docs", type=int, default=0,
                   help="lm-eval word perplexity on the first N WikiText-2 articles (0: skip; -1: all)")
    p.add_argument("--xsum", type=int, default=0, metavar="N",
                   help="summarise the first N XSum prompts of --data-dir/xsum and report ROUGE-1/2/L (0: skip)")
    p.add_argument("--xsum-shots", type=int, default=1, choices=(0, 1))
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generation batch (XSum)")
    p.add_argument("--griffin", type=float, default=None, metavar="DENSITY",
                   help="GRIFFIN per-prompt experts: XSum decodes through them, accuracy uses classification mode")
    _griffin_args(p)
    _chat_args(p, "XSum prompts as user turns of the chat template (default: raw, the GRIFFIN paper's protocol)")
    p.add_argument("--out", default="seap-eval", help="folder for eval.json and eval.md")

    p = sub.add_parser("bench", help="prefill/decode tokens/s of the dense model and pruned ones, in one run")
    _model_args(p)
    add_runtime_args(p, device_map=True)
    p.add_argument("--compare", action="append", default=[], help="pruned model folder (repeatable)")
    p.add_argument("--plan", action="append", default=[], help="plan folder[:expert] applied to --model (repeatable)")
    p.add_argument("--griffin", type=float, action="append", default=[], metavar="DENSITY",
                   help="also time GRIFFIN per-prompt experts at this density on --model (repeatable)")
    _griffin_args(p)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompts", default=None, metavar="TASK_OR_FILE",
                   help="real prompts (their first --prompt-len tokens) from a task, the embedded corpus or a "
                        ".txt/.jsonl file, as --task of prune; default: random tokens. GRIFFIN's union depends on them")
    p.add_argument("--data-dir", default=None, help="with --prompts: local task data (e.g. ../shared/data)")
    _chat_args(p, "with --prompts: the last --prompt-len tokens of each text as a chat-template user turn "
                  "(default: raw text)")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--batch", type=int, action="append", default=None, help="batch size (repeatable; default 1 and 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-path", default="seap", choices=DECODE_PATHS,
                   help="seap: lean greedy loop with the KV cache; generate: transformers' generate()")
    p.add_argument("--backend", default="torch", choices=("torch", "llamacpp"),
                   help="torch (default) or llamacpp: every model exported to GGUF at --quant and timed in "
                        "llama.cpp (batch 1; needs the llamacpp extra); .gguf files are timed as they are")
    p.add_argument("--quant", default="q8_0", choices=OUT_TYPES, help="with --backend llamacpp: GGUF type")
    p.add_argument("--out", default="seap-bench", help="folder for bench.json and bench.md")

    p = sub.add_parser("export", help="write a pruned model for llama.cpp (GGUF) or vLLM (DeciLM block configs)")
    _model_args(p)
    add_runtime_args(p, device_map=True)
    p.add_argument("--format", dest="fmt", default="gguf", choices=("gguf", "vllm"))
    p.add_argument("--plan", default=None, help="plan folder applied to --model first (else --model is exported)")
    p.add_argument("--expert", default=None, help="with --plan: which expert")
    p.add_argument("--type", dest="out_type", default="f32", choices=OUT_TYPES,
                   help="GGUF tensor type: f32, f16, q8_0 (written here), q4_k_m (llama.cpp's quantizer)")
    p.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                   help="copy the tokenizer from this GGUF (default: the base model's GGUF when there is one)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="vLLM: check that widths and heads split over N GPUs")
    p.add_argument("--check", type=int, default=0, metavar="TOKENS",
                   help="GGUF: compare llama.cpp's next-token logits with transformers on the first TOKENS "
                        "WikiText-2 tokens (needs the llamacpp extra and --data-dir)")
    p.add_argument("--data-dir", default=None, help="with --check: folder holding wikitext2/ (e.g. ../shared/data)")
    p.add_argument("--out", required=True, help="a .gguf file (gguf) or a folder (vllm)")

    p = sub.add_parser("route", help="SEAP's task router: fit it, evaluate it, explain its choices")
    rsub = p.add_subparsers(dest="route_cmd", required=True)
    r = rsub.add_parser("fit", help="fit a router over the experts of one or more plans")
    _model_args(r)
    add_runtime_args(r, device_map=True)
    r.add_argument("--plan", action="append", required=True, help="plan folder (repeatable)")
    r.add_argument("--task", dest="tasks", action="append", default=None,
                   help="router class (repeatable); default: every expert of the plans with a loadable corpus")
    r.add_argument("--data-dir", default=None, help="local task data (e.g. ../shared/data)")
    r.add_argument("--split", default="train", help="split of the task data to fit on (default train)")
    r.add_argument("--limit", type=int, default=1500, help="training prompts per task")
    r.add_argument("--threshold", type=float, default=0.5,
                   help="top probability under which a prompt goes to the generic expert")
    r.add_argument("--background", action="append", default=None,
                   help="plain-text corpus that teaches 'no task' (repeatable; default default:general_text)")
    r.add_argument("--out", default=None, help="router folder (default: <first plan>/../router)")
    r = rsub.add_parser("eval", help="per-task precision, recall, F1 and confusion matrix on held-out prompts")
    _model_args(r)
    add_runtime_args(r, device_map=True)
    r.add_argument("--router", required=True)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--split", default="validation")
    r.add_argument("--limit", type=int, default=None, help="held-out prompts per task")
    r.add_argument("--unknown", action="append", default=[],
                   help="corpus of a kind the router was not fitted on: reports the share sent to generic")
    r.add_argument("--out", default="seap-route-eval")
    r = rsub.add_parser("explain", help="which expert each prompt gets, with the probabilities")
    _model_args(r)
    add_runtime_args(r, device_map=True)
    r.add_argument("--router", required=True)
    r.add_argument("prompts", nargs="+")
    r.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="greedy generation on the dense model, one expert or routed experts")
    _model_args(p)
    add_runtime_args(p, device_map=True)
    p.add_argument("prompts", nargs="*", help="prompts (or --file)")
    p.add_argument("--file", default=None, help="text file with one prompt per line, or JSONL with a 'prompt' key")
    p.add_argument("--plan", action="append", default=[], help="plan folder (repeatable)")
    p.add_argument("--router", default=None, help="router folder: each prompt runs on the expert it picks")
    p.add_argument("--expert", default=None, help="one expert for every prompt (default: the plan's default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--griffin", type=float, default=None, metavar="DENSITY",
                   help="GRIFFIN: per-prompt experts keeping this share of each layer's FFN neurons (e.g. 0.5)")
    _griffin_args(p)
    p.add_argument("--stop", action="append", default=[], help="cut the output at this string (repeatable)")
    _chat_args(p, "each prompt as a user turn of the model's chat template (default when it has one)")
    p.add_argument("--json", action="store_true")

    from .analyze.cli import add_parser as add_analyze
    add_analyze(sub)

    p = sub.add_parser("info", help="describe a plan folder or a pruned model folder (read from the headers)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    return ap


def _print_result(res, out) -> None:
    s = res.summary()
    print(f"pruned {s['base_model']} with {s['method']} (expert {s['expert']}) in {s['seconds']:.0f}s")
    print(f"  prunable parameters removed: {s['achieved_ratio']:.2%} (target {s['target_ratio']:.2%})")
    print(f"  total parameters: {s['params_before']:,} -> {s['params_after']:,} "
          f"({s['total_reduction']:.1%} fewer)")
    print(f"  FFN parameters:   {s['ffn_params_before']:,} -> {s['ffn_params_after']:,}")
    w = s["ffn_widths"]
    print(f"  FFN widths: {w[0] if len(set(w)) == 1 else f'{min(w)}..{max(w)} per layer'}"
          + (f"; heads kept per layer {s['heads_kept']}" if s.get("heads_kept") else ""))
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
    from .errors import DataError

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


def _route(pipeline, args, rt) -> None:
    from .router import RouterConfig

    if args.route_cmd == "fit":
        cfg = RouterConfig(threshold=args.threshold, limit=args.limit,
                           background=tuple(args.background or RouterConfig.background))
        router = pipeline.fit_router(args.model, args.plan, tasks=args.tasks, data_dir=args.data_dir,
                                     split=args.split, config=cfg, out=args.out, runtime=rt)
        counts = router.meta["train_counts"]
        print(f"router over {len(router.classes)} classes fitted in {router.meta['fit_seconds']:.0f}s "
              f"(train accuracy {router.meta['train_accuracy']:.3f})")
        for c in router.classes:
            print(f"  {c}: {counts[c]} prompts -> expert {router.experts[c]}")
        print(f"  threshold {router.threshold}: lower top probability -> generic; saved to {router.meta['folder']}")
    elif args.route_cmd == "eval":
        res = pipeline.evaluate_router(args.model, args.router, data_dir=args.data_dir, split=args.split,
                                       limit=args.limit, unknown=args.unknown, out=args.out, runtime=rt)
        print(res.markdown(), end="")
        print("results: " + ", ".join(res.meta.get("files", {}).values()))
    else:
        routes = pipeline.explain(args.model, args.router, args.prompts, runtime=rt)
        if args.json:
            print(json.dumps([{"prompt": p, **r.__dict__} for p, r in zip(args.prompts, routes)], indent=2))
            return
        for p, r in zip(args.prompts, routes):
            top = sorted(r.probs.items(), key=lambda kv: -kv[1])[:4]
            print(f"{p[:60]!r} -> {r.expert} ({r.reason}, p={r.confidence:.2f}); "
                  + ", ".join(f"{c} {v:.2f}" for c, v in top))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from . import pipeline

        rt = runtime_from_args(args)
        if args.cmd == "collect":
            stats = pipeline.collect(args.model, _calibration(args), args.out, heads=args.heads, runtime=rt)
            for task, s in stats.items():
                print(f"{task}: {s.meta.get('n_texts')} texts, {s.n_tokens:,} tokens -> {args.out}")
        elif args.cmd == "prune":
            from .analyze.schedule import load_schedule

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
                refit_bias=args.refit_bias, refit_choice=args.refit_choice)
            res = pipeline.prune(args.model, cfg, _calibration(args), args.out, expert=args.expert, runtime=rt,
                                 shard_size=args.shard_size)
            _print_result(res, args.out)
        elif args.cmd == "apply":
            res = pipeline.apply(args.model, args.plan, expert=args.expert, out=args.out, runtime=rt,
                                 shard_size=args.shard_size)
            _print_result(res, None)
        elif args.cmd == "eval":
            from .evaluation.runner import EvalConfig, markdown_table

            cfg = EvalConfig(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                             data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                             ppl_window=args.ppl_window, ppl_windows=args.ppl_windows, token_ppl=not args.no_ppl,
                             word_ppl_docs=None if args.word_ppl_docs == -1 else args.word_ppl_docs,
                             xsum=args.xsum, xsum_shots=args.xsum_shots, gen_batch_size=args.gen_batch_size,
                             griffin=args.griffin, griffin_shared=args.griffin_shared,
                             griffin_short=args.griffin_short, griffin_prior_tokens=args.griffin_prior_tokens,
                             chat=bool(args.chat))
            plans = args.plan or [None]
            report = pipeline.evaluate(args.model, plan=plans[0], extra_plans=plans[1:], experts=args.experts,
                                       config=cfg, out=args.out, routed=args.routed, runtime=rt)
            print(markdown_table([report]), end="")
            print(f"results: {Path(args.out) / 'eval.json'}, {Path(args.out) / 'eval.md'}")
        elif args.cmd == "bench" and args.backend == "llamacpp":
            from .export import benchmark_gguf
            from .export.llamacpp import speed_markdown as gguf_markdown

            if args.griffin or args.griffin_shared or (args.batch and set(args.batch) != {1}):
                raise ConfigError("--backend llamacpp times static models at batch 1: drop --griffin and --batch")
            rows = benchmark_gguf(args.model, compare=args.compare, plans=args.plan, quant=args.quant,
                                  prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=args.warmup,
                                  repeats=args.repeats, out=args.out, runtime=rt)
            print(gguf_markdown(rows), end="")
            print(f"results: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}")
        elif args.cmd == "bench":
            from .bench import BenchConfig, speed_markdown

            cfg = BenchConfig(prompt_len=args.prompt_len, gen_len=args.gen_len,
                              batch_sizes=tuple(args.batch or (1, 8)), warmup=args.warmup, repeats=args.repeats,
                              decode_path=args.decode_path)
            rows = pipeline.benchmark(args.model, compare=args.compare, plans=args.plan, config=cfg, out=args.out,
                                      griffin=[_griffin(args, d) for d in args.griffin], prompts=args.prompts,
                                      data_dir=args.data_dir, griffin_shared=args.griffin_shared, runtime=rt,
                                      chat=bool(args.chat))
            print(speed_markdown(rows), end="")
            print(f"results: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'}")
        elif args.cmd == "export":
            from .export import export_model

            rep = export_model(args.model, args.out, fmt=args.fmt, plan=args.plan, expert=args.expert,
                               out_type=args.out_type, tokenizer_from=args.tokenizer_from,
                               tensor_parallel=args.tensor_parallel, check=args.check, data_dir=args.data_dir,
                               runtime=rt)
            _print_export(rep)
        elif args.cmd == "route":
            _route(pipeline, args, rt)
        elif args.cmd == "analyze":
            from .analyze.cli import run as run_analyze
            run_analyze(args, rt)
        elif args.cmd == "generate":
            prompts = list(args.prompts) + (_read_prompts(args.file) if args.file else [])
            rows = pipeline.generate(args.model, prompts, plans=args.plan, router=args.router, expert=args.expert,
                                     max_new_tokens=args.max_new_tokens, griffin=_griffin(args, args.griffin),
                                     stop=args.stop, runtime=rt, chat=args.chat)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for row in rows:
                    notes = [f"FFN kept {100 * row['kept_fraction']:.0f}%"] if row["kept_fraction"] < 1 else []
                    if row["confidence"] is not None:
                        notes.append(f"routed: {row['reason']}, p={row['confidence']:.2f}")
                    extra = f" ({'; '.join(notes)})" if notes else ""
                    print(f"--- [{row['expert']}]{extra} {row['prompt']!r}\n{row['text']}")
        elif args.cmd == "info":
            data = pipeline.info(args.path)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                for k, v in data.items():
                    if isinstance(v, dict) and "kind" in v:  # a prune output: its plan and its model
                        print(f"{k}:" + "".join(f"\n  {kk}: {vv}" for kk, vv in v.items()))
                    else:
                        print(f"{k}: {v}")
    except SeapError as err:
        print(f"seap: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seap: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

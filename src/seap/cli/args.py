"""The `seap` command's arguments: one function per command adds its subparser (handlers: seap.cli.commands)."""

from __future__ import annotations

import argparse
import re

from ..config import HEAD_MODES, PRESETS, RECONSTRUCT_MODES, REFIT_CHOICES
from ..evaluation.bench import DECODE_PATHS
from ..export.gguf import OUT_TYPES
from ..inference.griffin import DEFAULT_SHORT, SHORT_MODES
from ..model.runtime import add_runtime_args
from ..tasks import ACCURACY_TASKS, SUITE, TASK_NAMES


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


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="when another seap run is writing --out, wait for it to "
                   "finish instead of refusing")


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


GRIFFIN_SHARED_HELP = ("with --griffin: one expert per batch (top k of the pooled statistic) instead of one per "
                       "prompt; faster decoding at batch > 1, and a prompt no longer gets exactly its own experts")


def _add_collect(sub) -> None:
    p = sub.add_parser("collect", help="activation statistics of task corpora")
    _model_args(p)
    add_runtime_args(p, load=True)
    _data_args(p)
    p.add_argument("--heads", action="store_true", help="also collect attention-output statistics")
    p.add_argument("--out", default="seap-stats", help="folder for <task>.safetensors")
    _wait_arg(p)


def _shard_arg(p) -> None:
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard of the pruned model (e.g. 2GB)")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="statistics -> plan -> pruned model, in one command")
    _model_args(p)
    add_runtime_args(p, load=True)
    _shard_arg(p)
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
                        "optimal-brain-surgeon on the layer's Gram matrix, same widths; the seap presets' default), keep "
                        "the score's (score: no d_ff^3 choice, cheaper at scale), or auto (obs for an expert of a "
                        "named task, score for the generic expert and corpus files: safer on a small corpus)")
    p.add_argument("--obs-pool", type=float, default=None,
                   help="with the OBS choice: the channels it may remove are the score's lowest OBS_POOL x (the "
                        "channels each layer loses), e.g. 2; 1 is the score's own choice (default: any channel)")
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
    _wait_arg(p)


def _add_apply(sub) -> None:
    p = sub.add_parser("apply", help="apply a saved plan to its base model")
    _model_args(p)
    add_runtime_args(p, load=True)
    _shard_arg(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--expert", default=None)
    p.add_argument("--out", required=True)
    _wait_arg(p)


def _add_eval(sub) -> None:
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


def _add_bench(sub) -> None:
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
    p.add_argument("--batch", dest="batch_sizes", type=int, action="append", default=None, help="batch size (repeatable; default 1 and 8)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-path", default="seap", choices=DECODE_PATHS,
                   help="seap: lean greedy loop with the KV cache; generate: transformers' generate()")
    p.add_argument("--backend", default="torch", choices=("torch", "llamacpp"),
                   help="torch (default) or llamacpp: every model exported to GGUF at --quant and timed in "
                        "llama.cpp (batch 1; needs the llamacpp extra); .gguf files are timed as they are")
    p.add_argument("--quant", default="q8_0", choices=OUT_TYPES, help="with --backend llamacpp: GGUF type")
    p.add_argument("--out", default="seap-bench", help="folder for bench.json and bench.md")


def _add_export(sub) -> None:
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
    _wait_arg(p)


def _add_route(sub) -> None:
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
    _wait_arg(r)
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


def _add_generate(sub) -> None:
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


def _add_analyze(sub) -> None:
    from ..analyze.commands import add_parser

    add_parser(sub)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a plan folder or a pruned model folder (read from the headers)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


# one function per command, in the order `seap --help` lists them
PARSERS = (_add_collect, _add_prune, _add_apply, _add_eval, _add_bench, _add_export, _add_route, _add_generate,
           _add_analyze, _add_info)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seap", description="Training-free pruning of LLM feed-forward experts.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in PARSERS:
        add(sub)
    return ap


def as_flags(message: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """A config error names fields in backticks (`ratio`); on the command line they are the chosen
    command's flags (--ratio). Fields without a flag lose their backticks."""
    flags: dict[str, str] = {}
    node = parser
    while node is not None:
        sub = None
        for action in node._actions:  # argparse keeps no public map from dest to option
            if action.option_strings:
                flags.setdefault(action.dest, max(action.option_strings, key=len))
            elif isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(args, action.dest, None))
        node = sub
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), message)

"""Render stage of benchmarks/run.py: RESULTS.md and accuracy_vs_ratio.png from benchmarks/results/."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from datetime import date
from importlib.metadata import version
from pathlib import Path

from common import common_averages, paired_delta, read_result, CALIBRATION_LIMIT, DATA, HERE, LM_CORPUS, MODELS, RATIOS, RESULTS, ROOT, TASKS
from llamacpp import llamacpp_section
from routing import ROUTED_ROWS
from shortprompts import shortprompts_section
from schedules import schedules_section
from seap.tasks import PAPER_METRIC

ROW_ORDER = ("WandA-sp", "FLAP", "WandA-sp (WikiText-2 calibration)", "FLAP (WikiText-2 calibration)",
             "SEAP (task experts)", "SEAP (task experts), reference's effective 44%", "SEAP (routed)", "SEAP-gen",
             "SEAP s_F (task experts)", "SEAP-gen s_F", "SEAP uniform (task experts)", "SEAP fitted (task experts)",
             "WandA-sp + sequential refit", "FLAP + sequential refit", "SEAP (task experts) + sequential refit",
             "SEAP-gen + refit", "SEAP-gen + sequential refit", "WandA-sp + refit, OBS choice",
             "FLAP + refit, OBS choice", "SEAP (task experts, default)", "SEAP (routed, default)",
             "SEAP-gen + sequential refit, OBS choice",
             "SEAP-gen (default: refit, OBS choice)", "SEAP-gen (default with ridge 0.1)", "SEAP-gen (default with ridge 1)",
             "SEAP (task experts, default) + fitted schedule", "SEAP (task experts, default with ridge 0.1)")
# what seap's presets do, `seap` (a task expert per task, or routed) and `seap-gen` (the generic
# expert), each with the row of its paper recipe
GENERIC_DEFAULT = "SEAP-gen (default: refit, OBS choice)"
DEFAULT_ROWS = {"SEAP (task experts, default)": "SEAP (task experts)", GENERIC_DEFAULT: "SEAP-gen"}
# what the generic default is also compared with: the variants of the refit
REFIT_VARIANTS = ("SEAP-gen + sequential refit", "FLAP + refit, OBS choice", "WandA-sp + refit, OBS choice",
                  "SEAP-gen + sequential refit, OBS choice", "FLAP + sequential refit", "WandA-sp + sequential refit",
                  "SEAP-gen (default with ridge 0.1)", "SEAP-gen (default with ridge 1)")
# ... and those of the task-expert default
TASK_DEFAULT_VARIANTS = (GENERIC_DEFAULT, "SEAP (task experts, default) + fitted schedule",
                         "SEAP (task experts, default with ridge 0.1)")


NOT_BOOLQ = tuple(t for t in TASKS if t != "boolq")  # the comparisons without BoolQ's yes/no drift


def _row(rows: list[dict], name: str, ratio: float) -> dict | None:
    return next((r for r in rows if r["row"] == name and r["ratio"] == ratio), None)


def _default_rows(rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(preset's row name, its paper recipe's row name, row) for every measured ratio of each preset."""
    return [(name, paper, r) for name, paper in DEFAULT_ROWS.items() for r in rows if r["row"] == name]


def _load(model: str, sub: str = "") -> list[dict]:
    """The accuracy rows of results/<model>/<sub> (none when the folder does not exist), in ROW_ORDER."""
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / model / sub).glob("*.json"))
            if p.name not in ("speed.json", "router.json", "scorer.json", "unknown_prompts.json", "router_variants.json")
            and not p.name.startswith(("xsum_", "llamacpp_", "griffin_speed", "precision", "short_prompts"))]
    order = {r: i for i, r in enumerate(ROW_ORDER)}
    return sorted(rows, key=lambda d: (d["ratio"], order.get(d["row"], 99)))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ratio(row: dict, ref: dict) -> float:
    """row / ref on the items both scored."""
    a, b, _ = common_averages(row, ref)
    return a / b


def accuracy_table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["row"] == "dense")
    head = (["method", "ratio", "N", "params"] + [f"{t} ({PAPER_METRIC[t]})" for t in TASKS]
            + ["average ± s.e.", "% of dense", "Δ vs dense ± paired s.e.", "token ppl", "word ppl"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        avg = r["average"]
        delta = "—" if r is dense else "{:+.1f} ± {:.1f}".format(*(100 * x for x in paired_delta(r, dense)))
        ppl = r.get("token_perplexity") or {}
        wppl = r.get("word_perplexity") or {}
        cells = [r["row"], "0" if r is dense else f"{int(100 * r['ratio'])}%", str(r["eval_config"]["limit"]),
                 f"{r['params'] / 1e6:.1f}M"]
        cells += [_pct(r["tasks"][t]["paper"]) if t in r["tasks"] else "—" for t in TASKS]
        cells += [f"{100 * avg['value']:.1f} ± {100 * avg['stderr']:.1f}",
                  "{:.1f}%".format(100 * _ratio(r, dense)), delta,
                  f"{ppl['perplexity']:.1f}" if ppl else "—",
                  f"{wppl['word_perplexity']:.1f}" if wppl.get("word_perplexity") else "—"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def acc_detail_table(rows: list[dict]) -> str:
    head = ["method", "ratio"] + [f"{t} acc / acc_norm" for t in TASKS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], f"{int(100 * r['ratio'])}%"]
        for t in TASKS:
            m = r["tasks"].get(t, {}).get("metrics", {})
            cells.append(f"{_pct(m.get('acc'))} / {_pct(m.get('acc_norm'))}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def speed_tables(model: str) -> str:
    data = read_result(RESULTS / model / "speed.json")
    if data is None:
        return "_speed stage not run yet_\n"
    text = ""
    for name, run in data["runs"].items():
        cfg = run["config"]
        text += (f"\nDecode path `{name}` ({'seap.inference.decoding.greedy: prefill + KV-cache steps, nothing else per token' if name == 'seap' else 'transformers generate()'}); "
                 f"prompt {cfg['prompt_len']} tokens, {cfg['gen_len']} generated, warm-up {cfg['warmup']}, "
                 f"median of {cfg['repeats']} interleaved repeats.\n\n")
        head = ("model", "batch", "weights MB", "peak MB", "prefill tok/s", "decode tok/s", "prefill ×", "decode ×",
                "bytes limit ×", "decode / limit")
        text += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
        for r in run["rows"]:
            text += (f"| {r['model']} | {r['batch']} | {r['weight_MB']:.0f} | {r['peak_MB']:.0f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | "
                     f"{r['bytes_limit']:.2f} | {100 * r['of_limit']:.0f}% |\n")
    return text


def plot(all_rows: dict[str, list[dict]], dest: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(all_rows), figsize=(6 * len(all_rows), 4.2), squeeze=False)
    for ax, (model, rows) in zip(axes[0], all_rows.items()):
        dense = next(r for r in rows if r["row"] == "dense")
        for name in ROW_ORDER:
            pts = sorted((r["ratio"], r["average"]["value"], r["average"]["stderr"]) for r in rows if r["row"] == name)
            if not pts:
                continue
            xs = [0.0] + [p[0] for p in pts]
            ys = [dense["average"]["value"]] + [p[1] for p in pts]
            es = [dense["average"]["stderr"]] + [p[2] for p in pts]
            ax.errorbar([100 * x for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es], marker="o",
                        capsize=3, label=name)
        ax.set_title(model)
        ax.set_xlabel("pruned share of FFN parameters (%)")
        ax.set_ylabel("average accuracy, paper metric (%)")
        ax.set_xticks([0] + [int(100 * r) for r in RATIOS])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return True


def routing_section(model: str, rows: list[dict]) -> str:
    """The router on held-out prompts (the paper's Table 6) and routed against oracle accuracy."""
    from dataclasses import fields

    from seap.inference.router import RouterEval

    data = read_result(RESULTS / model / "router.json")
    if data is None:
        return ""
    res = RouterEval(**{f.name: data[f.name] for f in fields(RouterEval)})
    counts = ", ".join(f"{c} {n}" for c, n in data["train_counts"].items())
    text = (f"\nRouter (mean input embedding -> logistic regression, fitted in {data['fit_seconds']:.0f}s on the train "
            f"splits: {counts}; threshold {data['threshold']}), on all {res.meta['n']} validation prompts:\n\n")
    text += res.markdown()
    pairs = []
    oracles = {routed: oracle for routed, oracle, _, _ in ROUTED_ROWS}
    for r in rows:
        if r["row"] not in oracles:
            continue
        oracle = _row(rows, oracles[r["row"]], r["ratio"])
        if oracle is None:
            continue
        own = sum(n for t, c in r["meta"]["routing"].items() for e, n in c.items() if e == t)
        total = sum(n for c in r["meta"]["routing"].values() for n in c.values())
        d, se = paired_delta(r, oracle)
        routed, oracle_avg, _ = common_averages(r, oracle)
        mem = r["meta"]["memory"]
        pairs.append(f"| {r['row']} | {int(100 * r['ratio'])}% | {100 * oracle_avg:.1f} | "
                     f"{100 * routed:.1f} | {100 * d:+.2f} ± {100 * se:.2f} | {100 * own / total:.1f}% | "
                     f"{mem['base_bytes'] / 1e6:.0f} | {mem['added_bytes'] / 1e6:.0f} ({100 * mem['added_fraction']:.0f}%) |")
    if pairs:
        text += ("\nRouted against oracle (each task on its own expert), same items; memory of the multi-expert model "
                 "(base weights once, each expert's gathered FFN rows and columns added):\n\n"
                 "| row | ratio | oracle average | routed average | Δ routed − oracle ± paired s.e. | items on their own "
                 "task's expert | base MB | experts add MB |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(pairs) + "\n")
    return text


def _xsum_rows(model: str) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in (RESULTS / model).glob("xsum_*.json")]
    return sorted(rows, key=lambda r: (r["kind"] != "dense", -(r["density"] or 1), r["kind"]))


def _rouge_delta(row: dict, dense: dict, key: str = "rougeL") -> tuple[float, float]:
    """Mean per-item difference of a ROUGE F-measure (same prompts) and its paired standard error."""
    d = [a - b for a, b in zip(row["items"][key], dense["items"][key])]
    n = len(d)
    mean = sum(d) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def griffin_section(model: str) -> str:
    """XSum ROUGE and decode speed: dense, GRIFFIN per-prompt experts, static magnitude at the same density."""
    rows = _xsum_rows(model)
    text = ""
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    if dense:
        m = dense["meta"]
        text += (f"\nXSum ({m['shots']}-shot HELM prompts, first {dense['n']}, mean prompt {m['mean_prompt_tokens']:.0f} "
                 f"tokens; greedy, cut at \"###\", batches of {m['batch_size']} left-padded prompts), ROUGE F-measure "
                 "(%), rouge-score with stemming. GRIFFIN: each prompt keeps the top density × d_ff neurons of every "
                 "layer by its own prefill statistic; the decode steps of a batch read the union of its prompts' "
                 "neurons. GRIFFIN shared: one expert per batch, the top density × d_ff of the prompts' pooled "
                 "statistic, so a batch reads only that share. Magnitude: one static uniform mask (no protected "
                 "layers), the same density. Minutes: wall time while other benchmark jobs shared the 2 cores "
                 "(not a speed figure; the speed table below is).\n\n"
                 "| row | ROUGE-1 | ROUGE-2 | ROUGE-L ± s.e. | Δ ROUGE-L vs dense ± paired s.e. | FFN kept per prompt "
                 "| FFN read per batch | minutes |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            delta = "—" if r is dense else "{:+.2f} ± {:.2f}".format(*(100 * x for x in _rouge_delta(r, dense)))
            dynamic = r["kind"] in ("griffin", "shared", "griffin-prior", "griffin-density")
            kept = r["meta"]["kept_fraction"] if dynamic else (r["density"] or 1.0)
            read = r["meta"]["union_fraction"] if dynamic else (r["density"] or 1.0)
            text += (f"| {r['row']} | {100 * r['rouge']['rouge1']:.2f} | {100 * r['rouge']['rouge2']:.2f} | "
                     f"{100 * r['rouge']['rougeL']:.2f} ± {100 * r['stderr']['rougeL']:.2f} | {delta} | "
                     f"{100 * kept:.0f}% | {100 * read:.0f}% | {r['seconds'] / 60:.1f} |\n")
    data = read_result(RESULTS / model / "griffin_speed.json")
    if data is not None:
        cfg = data["config"]
        text += (f"\nGRIFFIN decode speed (`seap.evaluation.bench`, prompts: the first {cfg['prompt_len']} tokens of "
                 f"{data.get('prompts', 'random tokens')}, {cfg['gen_len']} "
                 f"generated, warm-up {cfg['warmup']}, median of {cfg['repeats']} interleaved repeats; GRIFFIN's "
                 "selection is timed with the prefill and its weight gather with the decode):\n\n"
                 "| row | batch | prefill × | decode tok/s | decode × | bytes limit × | FFN read |\n"
                 "|---|---|---|---|---|---|---|\n")
        for r in data["rows"]:
            read = r.get("union_fraction")
            text += (f"| {r['model']} | {r['batch']} | {r['prefill_ratio']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_ratio']:.2f} | {r['bytes_limit']:.2f} | "
                     f"{'static' if read is None else f'{100 * read:.0f}%'} |\n")
    data = read_result(RESULTS / model / "griffin_speed_b1.json")
    if data is not None:
        g = next(r for r in data["rows"] if r["model"] != "dense")
        dense_tok_s = next(r for r in data["rows"] if r["model"] == "dense")["decode_tok_s"]
        runs = {n: m["results"]["1"]["decode_runs"] for n, m in data["models"].items()}
        text += (f"\nBatch 1 again, {data['config']['repeats']} repeats ({data['note']}): {g['model']} decodes at "
                 f"{g['decode_tok_s']:.1f} tok/s against dense {dense_tok_s:.1f}, "
                 f"**{g['decode_ratio']:.3f}×** (bytes limit {g['bytes_limit']:.2f}×; decode seconds per repeat "
                 + "; ".join(f"{n} {min(v):.2f}–{max(v):.2f}" for n, v in runs.items())
                 + f"). Command: `{data['command']}`\n")
    return text


def griffin_findings(models) -> str:
    lines = []
    for model in models:
        rows = _xsum_rows(model)
        dense = next((r for r in rows if r["kind"] == "dense"), None)
        if not dense:
            continue
        within = []
        for r in rows:
            if r["kind"] not in ("griffin", "shared"):
                continue
            d, se = _rouge_delta(r, dense)
            mag = next((m for m in rows if m["kind"] == "magnitude" and m["density"] == r["density"]), None)
            vs = (f", magnitude at the same density {100 * mag['rouge']['rougeL']:.2f}" if mag else "")
            lines.append(f"- {model}, XSum: {r['row']} ROUGE-L {100 * r['rouge']['rougeL']:.2f} vs dense "
                         f"{100 * dense['rouge']['rougeL']:.2f} (Δ {100 * d:+.2f} ± {100 * se:.2f}){vs}.")
            if abs(d) <= 0.01 and r["kind"] == "griffin":
                within.append(r["density"])
        lines.append(f"- {model}, XSum: GRIFFIN (per-prompt experts) densities within 1 ROUGE-L point of dense: "
                     + (", ".join(f"{x:g}" for x in sorted(within)) if within else "none of those run") + ".")
        path = RESULTS / model / "griffin_speed.json"
        if path.is_file():
            sp = [r for r in json.loads(path.read_text())["rows"] if r["model"].startswith("GRIFFIN")]
            lines.append(f"- {model}, decode speed vs dense: " + ", ".join(
                f"{r['model']} batch {r['batch']} {r['decode_ratio']:.2f}×" for r in sp) + ".")
    return "\n".join(lines) + "\n" if lines else ""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CHANCE = {"piqa": 0.5, "boolq": 0.5, "winogrande": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25}


def findings(all_rows: dict[str, list[dict]]) -> str:
    """The paper's two accuracy claims, checked on these numbers (computed, not written by hand)."""
    lines = []
    chance = sum(CHANCE[t] for t in TASKS) / len(TASKS)
    for model, rows in all_rows.items():
        dense_row = next(r for r in rows if r["row"] == "dense")
        dense = dense_row["average"]["value"]

        def headroom(r: dict) -> float:  # on the items both rows scored
            a, b, _ = common_averages(r, dense_row)
            return (a - chance) / (b - chance)

        lines.append(f"- {model}: dense average {100 * dense:.1f}, {100 * (dense - chance):.1f} points above the "
                     f"nominal chance level {100 * chance:.1f} (1/2 for PIQA, BoolQ, WinoGrande; 1/4 for ARC and "
                     "OpenBookQA); 'headroom kept' = (row - chance) / (dense - chance), on the items both scored: "
                     + ", ".join(f"{r['row']} {int(100 * r['ratio'])}% {100 * headroom(r):.0f}%"
                                 for r in rows if r["row"] != "dense") + ".")
        seap = [r for r in rows if r["row"].startswith("SEAP")]
        at20 = [r for r in seap if r["ratio"] == 0.2]
        if at20:
            best = max(at20, key=lambda r: _ratio(r, dense_row))
            a, b, n = common_averages(best, dense_row)
            lines.append(f"- {model}, 20%: best SEAP variant is {best['row']} at {100 * a:.1f} = {100 * a / b:.1f}% of "
                         f"dense ({100 * b:.1f} on the same {n} items per task); the paper's claim on Llama-2-7B is 97.8%.")
        for routed, oracle_row, _, _ in ROUTED_ROWS:
            for r in (r for r in rows if r["row"] == routed):
                oracle = _row(rows, oracle_row, r["ratio"])
                if oracle:
                    d, se = paired_delta(r, oracle)
                    a, b, n = common_averages(r, oracle)
                    lines.append(f"- {model}, {int(100 * r['ratio'])}%: {routed} {100 * a:.1f} vs oracle {oracle_row} "
                                 f"{100 * b:.1f} ({n} items per task; Δ {100 * d:+.2f} ± {100 * se:.2f} paired s.e.; "
                                 "the issue asks for |Δ| ≤ 1 point).")
        at50 = {r["row"]: r for r in rows if r["ratio"] == 0.5}
        for name in ("SEAP (task experts)", *DEFAULT_ROWS):  # the paper's recipe and the presets' rows
            if name not in at50:
                continue
            for base in ("WandA-sp", "FLAP"):
                if base in at50:
                    a, b, n = common_averages(at50[name], at50[base])
                    lines.append(f"- {model}, 50%: {name} {100 * a:.1f} vs {base} {100 * b:.1f} "
                                 f"({100 * (a / b - 1):+.1f}% relative, {n} items per task).")
    return "\n".join(lines) + "\n"


def _pair(rows: list[dict], a: str, b: str, ratio: float, tasks=TASKS, items: str | None = None) -> str | None:
    """`a` against `b` at `ratio`: averages, paired difference and perplexities; `items` says which items
    were scored (default: N per task)."""
    ra, rb = _row(rows, a, ratio), _row(rows, b, ratio)
    if ra is None or rb is None:
        return None
    d, se = paired_delta(ra, rb, tasks)
    avg_a, avg_b, n = common_averages(ra, rb, tasks)
    ppl = lambda r: (r.get("token_perplexity") or {}).get("perplexity")  # noqa: E731
    pa, pb = ppl(ra), ppl(rb)
    tail = f"; WikiText-2 token ppl {pa:.1f} vs {pb:.1f}" if pa and pb else ""
    return (f"{a} {100 * avg_a:.1f} vs {b} {100 * avg_b:.1f} ({items or f'{n} items per task'}): "
            f"Δ {100 * d:+.2f} ± {100 * se:.2f} paired s.e. ({d / se if se else 0:+.1f} s.e.){tail}")


def reconstruction_findings(all_rows: dict[str, list[dict]]) -> str:
    """Where the gains come from: reconstruction per method, the default against the baselines, and
    the paper's protocol against the fair one (computed from the rows)."""
    lines = []
    for model, rows in all_rows.items():
        dense_row = next(r for r in rows if r["row"] == "dense")
        for default, paper, row in _default_rows(rows):
            ratio = row["ratio"]
            pct = int(100 * ratio)
            lines.append(f"- {model}, {pct}%, seap's default ({default}) keeps "
                         f"{100 * _ratio(row, dense_row):.1f}% of the dense average (on the items both scored).")
            others = REFIT_VARIANTS if default == GENERIC_DEFAULT else TASK_DEFAULT_VARIANTS
            for other in ("FLAP", "WandA-sp", paper, *others, "WandA-sp (WikiText-2 calibration)",
                          "FLAP (WikiText-2 calibration)"):
                text = _pair(rows, default, other, ratio)
                if text:
                    lines.append(f"- {model}, {pct}%: {text}.")
        for base in ("FLAP", "WandA-sp", "SEAP (task experts)"):
            for ratio in (0.2, 0.5):
                for variant in (" + sequential refit", " + refit, OBS choice"):
                    text = _pair(rows, base + variant, base, ratio)
                    if text:
                        lines.append(f"- {model}, {int(100 * ratio)}%, reconstruction alone: {text}.")
        for base in ("WandA-sp", "FLAP"):
            for ratio in (0.2, 0.5):
                text = _pair(rows, "SEAP (task experts)", f"{base} (WikiText-2 calibration)", ratio)
                if text:
                    lines.append(f"- {model}, {int(100 * ratio)}%, the paper's protocol (SEAP on each task's data, "
                                 f"{base} on WikiText-2): {text}.")
                text = _pair(rows, base, f"{base} (WikiText-2 calibration)", ratio)
                if text:
                    lines.append(f"- {model}, {int(100 * ratio)}%, {base} on the task data instead of WikiText-2: "
                                 f"{text}.")
        text = _pair(rows, "SEAP (task experts), reference's effective 44%", "SEAP (task experts)", 0.5)
        if text:
            lines.append(f"- {model}, nominal 50%: {text} (the reference code's '50%' removes 44%).")
    return ("\n### Reconstruction and the paper's protocol\n\n" + "\n".join(lines) + "\n") if lines else ""


def _boolq_labels() -> list[bool] | None:
    import pyarrow.parquet as pq

    path = DATA / "boolq" / "validation.parquet"
    return [bool(x) for x in pq.read_table(path, columns=["answer"]).column("answer").to_pylist()] \
        if path.is_file() else None


def _yes_share(items: list[float], labels: list[bool]) -> float:
    """Share of BoolQ items a row answered "yes": right on a "yes" item or wrong on a "no"."""
    said_yes = [c == gold for c, gold in zip(items, labels)]
    return sum(said_yes) / len(said_yes)


def boolq_findings(all_rows: dict[str, list[dict]]) -> str:
    """Which answer each row gives on BoolQ (from its per-item correctness and the gold labels): a model
    that answers one word to nearly everything scores that word's share of the split, whatever it
    reads, and a pruned model's accuracy then moves with its bias, not with its reading."""
    labels = _boolq_labels()
    if labels is None:
        return ""
    n = max(len(r["items"].get("boolq") or []) for rows in all_rows.values() for r in rows)
    yes_share = sum(labels[:n]) / n
    lines = []
    for model, rows in all_rows.items():
        shares = []
        for r in rows:
            if items := r["items"].get("boolq"):
                name = r["row"] if r["row"] == "dense" else f"{r['row']} {int(100 * r['ratio'])}%"
                shares.append(f"{name} {100 * _yes_share(items, labels):.0f}%")
        lines.append(f"- {model}: share of BoolQ items answered \"yes\": " + ", ".join(shares) + ".")
        for default, paper, row in _default_rows(rows):
            ratio = row["ratio"]
            for base in ("FLAP", "WandA-sp", paper):
                text = _pair(rows, default, base, ratio, NOT_BOOLQ)
                if text:
                    lines.append(f"- {model}, {int(100 * ratio)}%, the five tasks other than BoolQ: {text}.")
    return ("\n### BoolQ answers\n\n"
            f"{100 * yes_share:.0f}% of the first {n} BoolQ validation items are \"yes\". A row that answers \"no\" "
            "to nearly every item scores about the share of \"no\" whatever it reads; one that flips to \"yes\" "
            "scores about the share of \"yes\". Where the dense model answers one word to nearly everything, "
            "BoolQ accuracy of its pruned rows measures which word they drift to, and the six-task average "
            "moves with it; hence also the comparisons on the other five tasks.\n\n" + "\n".join(lines) + "\n")


def full_sets_findings(models) -> str:
    """seap's default against the baselines on the whole validation splits (results/<model>/full/, run with
    --limit above the largest split): the measurement that the 500-item rows sample."""
    lines = []
    labels = _boolq_labels()
    for model in models:
        rows = _load(model, "full")
        if labels and rows:
            yes = ", ".join(f"{r['row']} {100 * _yes_share(r['items']['boolq'], labels):.0f}%" for r in rows)
            lines.append(f"- {model}: share of the {len(labels)} BoolQ items answered \"yes\" ({100 * sum(labels) / len(labels):.0f}% "
                         f"of them are): {yes}.")
        for default, _, row in _default_rows(rows):
            pct = int(100 * row["ratio"])
            sizes = ", ".join(f"{t} {len(row['items'][t])}" for t in TASKS if row["items"].get(t))
            lines.append(f"- {model}, {pct}%, items: {sizes}.")
            for base in ("FLAP", "WandA-sp"):
                for tasks, what in ((TASKS, "six tasks"), (NOT_BOOLQ, "the five tasks other than BoolQ")):
                    text = _pair(rows, default, base, row["ratio"], tasks, "every item")
                    if text:
                        lines.append(f"- {model}, {pct}%, {what}: {text}.")
    return ("\n### The whole validation splits\n\n`python benchmarks/run.py --stage reconstruction --models "
            "smollm2-135m --limit smollm2-135m=3270 --ratios 0.5 --rows \"SEAP (task experts, default)\"` and the "
            "accuracy stage's `FLAP` and `WandA-sp` rows with the same limit (3270 is BoolQ's size, so every item of "
            "every split), results in `results/<model>/full/`. The 500-item rows above sample these splits; lm-eval "
            "without `--limit` scores all of them.\n\n" + "\n".join(lines) + "\n") if lines else ""


def scorer_section(model: str) -> str:
    d = read_result(RESULTS / model / "scorer.json")
    if d is None:
        return ""
    med = d["median_seconds"]
    if "head only" in med:  # three scorers (since the packed contexts)
        tok = d["tokens_run"]
        timed = (f"three scorers in turn in one process, medians of {len(d['seconds']['hflm'])} timed rounds after a "
                 f"warm-up: HFLM {med['hflm']:.1f} s; the LM head at the read positions only {med['head only']:.1f} s "
                 f"({d['speedup_head_only']:.2f}x, {tok['head only']} tokens through the model); and each question's "
                 f"context run once, its choices packed after it (seap's scorer) {med['selective']:.1f} s, "
                 f"**{d['speedup']:.2f}x** ({tok['selective']} tokens)")
    else:  # an older result: HFLM and the head-only scorer
        timed = (f"HFLM and seap's selective scorer in turn in one process, medians of {len(d['seconds']['hflm'])} "
                 f"timed rounds after a warm-up: HFLM {med['hflm']:.1f} s, selective {med['selective']:.1f} s, "
                 f"**{d['speedup']:.2f}x**")
    return (f"\nScorer (`{d['command']}`): lm-eval's own requests for the first {d['items_per_task']} items of each "
            f"task ({d['requests']} log-likelihoods), {timed}; largest log-likelihood difference from HFLM "
            f"{d['max_abs_diff']:.1e}, greedy flags {'equal' if d['greedy_equal'] else 'DIFFERENT'}.\n")


def render() -> Path:
    all_rows = {m: rows for m in MODELS if (rows := _load(m))}
    plotted = plot(all_rows, HERE / "accuracy_vs_ratio.png") if all_rows else False
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "lm_eval", "datasets"))
    cpu = platform.processor() or platform.machine()
    try:
        import os

        cpu += f", {os.cpu_count()} cores"
    except Exception:  # pragma: no cover
        pass
    text = f"""# seap benchmark results

Produced by `python benchmarks/run.py` (stages `accuracy`, `routing`, `speed`, `xsum`, `griffin-speed`, `schedules`, `llamacpp`, `render`; each result is cached
under `benchmarks/results/` and reused; about 1.5 hours on 2 CPU cores), plus the SEAP s_F rows by
`python benchmarks/run.py --stage accuracy --models smollm2-135m --extra --ratios 0.5`. Rendered {date.today().isoformat()} from seap commit
`{_git_commit()}`; Python {platform.python_version()}, {versions}; CPU only ({cpu}).

## Protocol

- Models: the bundled SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32) and Gemma 3 270M
  (Q4_K_M GGUF dequantised to float32).
- Accuracy: lm-evaluation-harness `simple_evaluate` on seap's task YAMLs (upstream prompts and
  choices), zero-shot, reading `../shared/data`. The six tasks score their **validation** splits
  (ARC and OpenBookQA score test upstream; the offline copies have no test split). Items: the first
  N of each split, as `lm_eval --limit N` (N per model below; ARC-Challenge has 299).
- The average is the paper's: acc_norm for PIQA, ARC-Challenge and OpenBookQA, acc for BoolQ,
  ARC-Easy and WinoGrande. "± s.e." is the standard error of that average (tasks independent);
  "Δ vs dense ± paired s.e." compares with the dense model on the same items, which is the error
  that decides whether two rows differ.
- Ratio = share of FFN parameters removed (these GQA models prune no heads); the achieved ratio is
  exactly the target in every row.
- Calibration: {CALIBRATION_LIMIT['smollm2-135m']} (SmolLM2) or {CALIBRATION_LIMIT['gemma3-270m']} (Gemma 3) training-split examples per task (prompt + gold answer) plus
  the embedded `{LM_CORPUS}` text. SEAP (task experts): each task is scored by the expert built
  from its own training corpus (the paper's protocol). SEAP-gen: one generic expert (language
  text weighted 3, each task 2) on every task. WandA-sp and FLAP: one mask from all of that
  calibration text pooled (more task data than their papers' WikiText/C4 calibration).
- Reconstruction rows (`+ sequential refit`, `+ refit`): the method's channels, then the kept
  columns of every FFN output projection refitted by least squares on the same calibration text
  (DESIGN 2.8; ridge 0.01, bias fitted: SmolLM2 is a Llama), `sequential` with each layer's
  activations taken on the outputs of the already pruned and refitted layers before it.
- seap's default since this stop (`seap` / `seap-gen` presets; row "SEAP-gen (default: refit, OBS
  choice)", and "SEAP (task experts, default)"): SEAP's statistics and logistic schedule set the
  layer widths (multiples of 32, seap's default widths), then each layer's FFN channels are chosen
  by greedy block OBS on the layer's Gram matrix of the same calibration text and the kept columns
  of the output projection refitted by least squares (ridge 0.01, bias fitted). "+ refit, OBS
  choice" rows apply the same to a baseline's widths. The paper's recipe is `seap-paper`, the rows
  "SEAP (task experts)" and "SEAP-gen".
- Scoring: the rows of the last stops use seap's selective scorer (lm-eval's HFLM with the LM head
  applied only at the scored positions; from commit f6d4d2a on, each question's shared context is
  also run once with its choices packed after it), the oldest rows HFLM itself. All give HFLM's
  log-likelihoods to float rounding (tested at 1e-5; the scorer section below measures it).
- The paper's protocol: WandA-sp and FLAP calibrated on general text as in their papers. Only
  WikiText-2's test split is available offline, so they take 128 pieces of 2,000 characters from
  60% of its raw stream on; perplexity scores its first 16 windows and first articles (about 5% of
  the stream), so the two never overlap. SEAP (task experts) is the paper's SEAP protocol; the
  reference implementation's "50%" removes about 44% of the prunable parameters, hence that row.
  The WikiText-2 perplexity of these rows is in-domain (same split, disjoint text): compare their
  accuracy, not their perplexity, with the other rows.
- SEAP (routed): the same task-expert plan, but a router picks each item's expert from its
  prompt (lm-eval contexts; the choices of one question are routed together): the mean input
  embedding of the prompt's tokens, a multinomial logistic regression (C = 0.1, standardised
  features) fitted on up to 1500 bare prompts per task from the train splits plus 1000 windows of
  the embedded general text (the "no task" class, routed to the generic expert); a top
  probability under 0.5 also goes to the generic expert. "Oracle" is the task-expert row. "SEAP
  (routed, default)": the same router over the task experts of seap's default (`seap` preset,
  reconstruction), oracle "SEAP (task experts, default)". The
  router also sends prompts of an unfamiliar form (length, digits, line breaks,
  symbols, case) to the generic expert; since stop 24 that form is compared with the class the
  prompt is routed to (farther than 99.8% of that class's training prompts; before: farther from
  every class than 99.5% of all training prompts). Since stop 27 the form test also counts line
  breaks (router version 3; a template fixes their count). The router tables and every routed
  row below are version 3 (the rows measured with version 2 were re-run in stop 28: 0 to 2 items
  per row scored differently).
- Token perplexity: WikiText-2 raw test, rows joined with "\\n\\n", the first non-overlapping
  windows of 1024 tokens (16 for SmolLM2, 8 for Gemma 3; per-model tokenizer, so not comparable
  across models). Word perplexity: lm-eval's `wikitext` task (rolling log-likelihood, words of the
  original text) on the first articles (2 for SmolLM2, 1 for Gemma 3). For SEAP (task experts) both come from the generic expert (language modelling has no
  task expert).
- Speed: `seap.evaluation.bench`, dense and pruned models in one process, ratios of medians. The bytes limit
  is dense bytes / pruned bytes read per decode step (all weights, the tied embedding once as the
  LM head, plus the KV cache at the mean context length). Peak MB on a CPU is the weights plus the
  KV cache held at the end of generation (activations are not counted); on CUDA it is the
  allocator's peak.

![accuracy against ratio](accuracy_vs_ratio.png)

## Findings (computed from the tables below)

{findings(all_rows) if all_rows else '_no results yet_'}{reconstruction_findings(all_rows)}{full_sets_findings(MODELS)}{griffin_findings(MODELS)}{boolq_findings(all_rows)}"""
    for model, rows in all_rows.items():
        ns = sorted({r["eval_config"]["limit"] for r in rows})
        text += (f"\n## {model}\n\nAccuracy (paper metric, %), N items per task ({' or '.join(map(str, ns))}; "
                 "a pair of rows of different N is compared on the first items of the smaller):\n\n")
        text += accuracy_table(rows) + "\nacc / acc_norm per task (%):\n\n" + acc_detail_table(rows)
        text += routing_section(model, rows)
        text += schedules_section(model, rows)
        text += "\nSpeed:\n" + speed_tables(model)
        text += griffin_section(model)
        text += shortprompts_section(model)
        text += llamacpp_section(model)
        text += scorer_section(model)
    from precision import precision_section
    from on_paper import paper_section
    from scaling import scaling_section

    from calibration import calibration_section, curve_plot
    from unknown_prompts import unknown_section

    text += calibration_section(MODELS) + unknown_section(MODELS)
    if not curve_plot(MODELS, HERE / "calibration_curve.png"):
        text = text.replace("![calibration curve](calibration_curve.png)\n", "")
    text += precision_section() + scaling_section() + paper_section()
    if not plotted:
        text = text.replace("![accuracy against ratio](accuracy_vs_ratio.png)\n", "")
    dest = HERE / "RESULTS.md"
    from seap._io import write_text

    write_text(dest, text)
    return dest

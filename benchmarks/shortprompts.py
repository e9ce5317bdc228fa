"""Short-prompt stage of benchmarks/run.py: does GRIFFIN hold up on the prompts people type?

200 short prompts (the first 50 questions of ARC-Easy and of ARC-Challenge validation and the first
100 PIQA validation goals, as a user would ask them), each as a user turn of the model's chat
template, greedy, 48 new tokens, batches of 8. Rows: the dense model; GRIFFIN at densities 0.5 and
0.75, pure (the paper's statistic) and with each short-prompt fix (`density`, seap's default: keep
d + (1 - d) * n0 / (n + n0) of the neurons of an n-token prompt, n0 = 64; `prior`: the same density,
the prompt's statistic plus the model's generic one worth n0 tokens); the static generic expert (SEAP-gen, the accuracy stage's calibration) keeping the same
share of FFN parameters. Scores, per continuation: ROUGE-L against the dense model's, and whether it
is degenerate (empty or whitespace only, or one token repeated 8 or more times in a row).

    python benchmarks/run.py --stage short-prompts --models smollm2-135m
"""

from __future__ import annotations

import json
import logging
import math
import time

from common import read_result, DATA, RESULTS, plan_for, stats_for, write

log = logging.getLogger("benchmarks.shortprompts")
N_NEW = 48
BATCH = 8
DENSITIES = (0.5, 0.75)
SOURCES = (("arc_easy", "question", 50), ("arc_challenge", "question", 50), ("piqa", "goal", 100))


def short_prompts() -> list[str]:
    import pandas as pd

    out = []
    for task, column, n in SOURCES:
        rows = pd.read_parquet(DATA / task / "validation.parquet")
        out += [str(q).strip() for q in rows[column].head(n)]
    return out


def degenerate(ids: list[int], text: str, run: int = 8) -> bool:
    """Empty or whitespace-only, or one token repeated `run` or more times in a row."""
    if not text.strip():
        return True
    longest = cur = 1
    for a, b in zip(ids, ids[1:]):
        cur = cur + 1 if a == b else 1
        longest = max(longest, cur)
    return len(ids) >= run and longest >= run


def _continue(lm, prompts: list[str], griffin=None) -> tuple[list[str], list[list[int]], float]:
    from seap.inference.decoding import generate_texts, stop_token_ids
    from seap.inference.griffin import griffin_selection
    from seap.model.loading import chat_prompts

    texts_in, templated = chat_prompts(lm.tokenizer, prompts, True)
    stops = set(stop_token_ids(lm))
    sel = griffin_selection(lm, griffin)  # None: dense; the prior of a 'prior' fix computed once
    texts, ids, kept = [], [], []
    for i in range(0, len(texts_in), BATCH):
        t, out = generate_texts(lm, texts_in[i:i + BATCH], N_NEW, selection=sel, special_tokens=not templated)
        texts += [x.strip() for x in t]
        for row in out.tokens.tolist():  # up to the first end-of-sequence id (what follows is padding)
            ids.append(row[:next((j for j, x in enumerate(row) if x in stops), len(row))])
        kept.append(out.stats.get("kept_fraction", 1.0))
    return texts, ids, sum(kept) / len(kept)


def _rows() -> list[tuple[str, float | None, str]]:
    rows = [("dense", None, "dense")]
    for d in DENSITIES:
        rows += [(f"GRIFFIN {d:g} pure", d, "none"), (f"GRIFFIN {d:g} + prior", d, "prior"),
                 (f"GRIFFIN {d:g} + density", d, "density"), (f"static generic {d:g}", d, "static")]
    return rows


def shortprompts(models: list[str]) -> None:
    from rouge_score import rouge_scorer

    from seap import GriffinConfig
    from seap.model.loading import load_model
    from seap.pruning.surgery import sliced

    prompts = short_prompts()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for model_name in models:
        path = RESULTS / model_name / "short_prompts.json"
        done = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        lm = load_model(model_name)
        if not lm.tokenizer.chat_template:
            log.info("%s has no chat template: skipped", model_name)
            continue
        dense = done["rows"].get("dense")
        for row, density, kind in _rows():
            if row in done["rows"]:
                continue
            t0 = time.time()
            if kind == "static":
                plan = plan_for(lm, stats_for(lm, model_name), "seap-paper", round(1 - density, 6), "generic", {})
                texts, ids, kept = _continue(sliced(lm, plan, "generic"), prompts)
                kept = density
            elif kind == "dense":
                texts, ids, kept = _continue(lm, prompts)
            else:
                texts, ids, kept = _continue(lm, prompts, GriffinConfig(density=density, short=kind))
            ref = dense["texts"] if dense else texts
            rl = [scorer.score(r, t)["rougeL"].fmeasure if (r or t) else 1.0 for r, t in zip(ref, texts)]
            deg = [int(degenerate(i, t)) for i, t in zip(ids, texts)]
            n = len(prompts)
            mean = sum(rl) / n
            data = {"texts": texts, "rougeL_vs_dense": rl, "degenerate": deg, "kept_fraction": kept,
                    "rougeL": mean, "rougeL_se": math.sqrt(sum((x - mean) ** 2 for x in rl) / (n - 1) / n),
                    "degenerate_share": sum(deg) / n, "seconds": round(time.time() - t0, 1)}
            done["rows"][row] = data
            if kind == "dense":
                dense = data
            done.update(model=model_name, prompts=prompts, new_tokens=N_NEW, batch=BATCH, chat_template=True)
            write(path, done)
            log.info("%s %s: ROUGE-L vs dense %.3f, degenerate %.1f%% (%.0fs)", model_name, row, mean,
                     100 * data["degenerate_share"], data["seconds"])


def shortprompts_section(model: str) -> str:
    d = read_result(RESULTS / model / "short_prompts.json")
    if d is None:
        return ""
    rows = d["rows"]
    text = (f"\nShort prompts (`python benchmarks/run.py --stage short-prompts`): {len(d['prompts'])} questions of "
            "ARC-Easy, ARC-Challenge and PIQA validation, each a user turn of the chat template, greedy, "
            f"{d['new_tokens']} new tokens; ROUGE-L of each continuation against the dense model's, and the share "
            "of degenerate ones (empty, or one token 8+ times in a row):\n\n"
            "| row | FFN kept | ROUGE-L vs dense ± s.e. | Δ vs pure GRIFFIN ± paired s.e. | degenerate |\n"
            "|---|---|---|---|---|\n")
    for name, r in rows.items():
        density = name.split()[1] if name.startswith("GRIFFIN") else None
        pure = rows.get(f"GRIFFIN {density} pure") if density else None
        delta = "—"
        if pure is not None and pure is not r:
            diff = [a - b for a, b in zip(r["rougeL_vs_dense"], pure["rougeL_vs_dense"])]
            m = sum(diff) / len(diff)
            se = math.sqrt(sum((x - m) ** 2 for x in diff) / (len(diff) - 1) / len(diff))
            delta = f"{100 * m:+.1f} ± {100 * se:.1f}"
        text += (f"| {name} | {100 * r['kept_fraction']:.0f}% | {100 * r['rougeL']:.1f} ± {100 * r['rougeL_se']:.1f} "
                 f"| {delta} | {100 * r['degenerate_share']:.1f}% |\n")
    return text

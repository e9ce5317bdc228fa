"""What the benchmark stages share: paths, models, rows, calibration statistics, plans and the results
files. Each stage module (accuracy, routing, speed, ...) imports from here; `run.py` only dispatches."""


from __future__ import annotations

import json
import math
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
DATA = ROOT.parent / "shared" / "data"

MODELS = ("smollm2-135m", "gemma3-270m")
RATIOS = (0.2, 0.5)
sys.path.insert(0, str(ROOT / "src"))  # a checkout without an install still runs
from seap.tasks import SUITE as TASKS  # noqa: E402
LM_CORPUS = "default:general_text"  # language-modelling text (weight 3 in SEAP-gen); not WikiText, whose test split is the perplexity set
CALIBRATION_LIMIT = {"smollm2-135m": 400, "gemma3-270m": 200}  # training examples per task corpus
# (row name, method, plan expert protocol, extra PruneConfig settings)
CONFIGS = (
    ("WandA-sp", "wanda-sp", "all", {}),
    ("FLAP", "flap", "all", {}),
    ("SEAP (task experts)", "seap-paper", "task", {}),
    ("SEAP-gen", "seap-paper", "generic", {}),
)
EXTRA_CONFIGS = (  # run after the required rows: SEAP with FLAP's fluctuation score s_F
    ("SEAP s_F (task experts)", "seap-paper", "task", {"score": "wifv"}),
    ("SEAP-gen s_F", "seap-paper", "generic", {"score": "wifv"}),
    # seap's default widths (multiples of 32) against the exact widths of the rows above: their cost
    ("SEAP-gen (multiple 32)", "seap-paper", "generic", {"multiple": 32}),
)

# Training-free reconstruction (seap.core.reconstruct) on top of each method, same calibration text
RECON_CONFIGS = (
    ("SEAP-gen + sequential refit", "seap-paper", "generic", {"reconstruct": "sequential"}),
    ("FLAP + sequential refit", "flap", "all", {"reconstruct": "sequential"}),
    ("WandA-sp + sequential refit", "wanda-sp", "all", {"reconstruct": "sequential"}),
    ("SEAP (task experts) + sequential refit", "seap-paper", "task", {"reconstruct": "sequential"}),
    ("SEAP-gen + refit", "seap-paper", "generic", {"reconstruct": "refit"}),
    # the channel choice for the refit (greedy OBS), on each allocation: seap's default is the first
    # the generic expert's channel choice: OBS (seap's default before issue 33) against the score's (now)
    ("SEAP-gen (default: refit, OBS choice)", "seap", "generic", {"multiple": None, "refit_choice": "obs"}),
    ("SEAP-gen (default: refit, score choice)", "seap", "generic", {"multiple": None}),
    ("FLAP + refit, OBS choice", "flap", "all", {"reconstruct": "refit", "refit_choice": "obs"}),
    ("WandA-sp + refit, OBS choice", "wanda-sp", "all", {"reconstruct": "refit", "refit_choice": "obs"}),
    ("SEAP (task experts, default)", "seap", "task", {"multiple": None}),
    ("SEAP-gen + sequential refit, OBS choice", "seap", "generic", {"multiple": None, "reconstruct": "sequential"}),
    # the ridge term of the default's refit (0.01): larger pulls the refit toward the plain cut
    ("SEAP-gen (default with ridge 0.1)", "seap", "generic", {"multiple": None, "ridge": 0.1, "refit_choice": "obs"}),
    ("SEAP-gen (default with ridge 1)", "seap", "generic", {"multiple": None, "ridge": 1.0, "refit_choice": "obs"}),
    # the default's reconstruction on the layer schedule fitted by `seap analyze sensitivity`
    ("SEAP (task experts, default) + fitted schedule", "seap", "task", {"multiple": None, "schedule": "fitted"}),
    # a task's corpus is a seventh of the generic's: a larger ridge against an overfitted refit
    ("SEAP (task experts, default with ridge 0.1)", "seap", "task", {"multiple": None, "ridge": 0.1}),
)

# The paper's protocol (SEAP on each task's own data, the baselines on general text as their papers
# calibrate them): WandA-sp and FLAP calibrated on WikiText-2, and SEAP at the reference code's
# effective ratio. Only WikiText-2's test split is here: its tail, disjoint from what perplexity scores.
PAPER_CONFIGS = (
    ("WandA-sp (WikiText-2 calibration)", "wanda-sp", "wikitext-tail", {}),
    ("FLAP (WikiText-2 calibration)", "flap", "wikitext-tail", {}),
)
# The SEAP reference code's "50%" removes about 44% of the prunable parameters: that row, nominally 50%
REFERENCE_CONFIGS = (("SEAP (task experts), reference's effective 44%", "seap-paper", "task", {"ratio": 0.44}),)
WIKITEXT_TAIL = (0.6, 128, 2000)  # from 60% of the test stream on: 128 pieces of 2,000 characters

log = logging.getLogger("benchmarks")


def slug(*parts) -> str:
    return "_".join(str(p).lower().replace(" ", "-").replace("(", "").replace(")", "").replace("/", "-")
                    .replace(":", "").replace(",", "") for p in parts)


def write(path: Path, data: dict) -> None:
    from seap._io import write_json

    write_json(path, data)


def stats_for(lm, model_name: str) -> dict:
    from seap import CalibrationData, collect

    data = CalibrationData((*TASKS, LM_CORPUS), data_dir=str(DATA), limit=CALIBRATION_LIMIT.get(model_name, 400),
                           batch_size=8, max_length=512)
    return collect(lm, data, CACHE / model_name / "stats", progress=False)


def plan_for(lm, stats: dict, method: str, ratio: float, protocol: str, extra: dict):
    from seap import PruneConfig
    from seap.model.fingerprints import fingerprint
    from seap.pruning.plan import build_plan

    if extra.get("schedule") == "fitted":
        extra = {**extra, "schedule": fitted_schedule(lm, lm.source.model_id)}
    # The accuracy rows were measured with exact widths (multiple 1, the default then); seap's default
    # is now multiples of 32, measured apart by the "SEAP-gen (multiple 32)" row.
    cfg = PruneConfig.from_method(method, **{"ratio": ratio, "multiple": 1, **extra})
    if protocol == "wikitext-tail":
        stats = {"wikitext2-tail": wikitext_stats(lm, lm.source.model_id)}
    if protocol == "all":  # baselines: one mask from all calibration text pooled
        it = iter(stats.values())
        merged = next(it)
        for s in it:
            merged = merged.merge(s)
        stats = {"all": merged}
    plan = build_plan(lm.model, lm.adapter, cfg, stats, base_model=lm.source.model_id,
                      revision=lm.source.revision, fingerprint=fingerprint(lm.model, lm.adapter))
    if cfg.reconstructs:
        plan = reconstruct_row(lm, plan, cfg, protocol)
    return plan


def fitted_schedule(lm, model_name: str):
    """The logistic schedule `seap analyze sensitivity` fits on this model with its defaults, cached
    as results/<model>/schedule/sensitivity.json (computed once, reused by every row that names it)."""
    from seap.analyze import analyze_sensitivity, load_schedule

    path = RESULTS / model_name / "schedule" / "sensitivity.json"
    if not path.is_file():
        t0 = time.time()
        res = analyze_sensitivity(lm, progress=False)
        write(path, res.data)
        log.info("%s: fitted k=%.3f x0=%.3f in %.0fs", model_name, res.data["schedule"]["k"],
                 res.data["schedule"]["x0"], time.time() - t0)
    return load_schedule(path)


def wikitext_tail(n: int | None = WIKITEXT_TAIL[1]) -> list[str]:
    """Calibration text for the baselines' own protocol: pieces of WikiText-2's test stream from 60% of
    it on. Token perplexity scores its first 16 windows of 1,024 tokens and word perplexity its first
    articles (about 5% of the stream), so the two never overlap. `n` pieces (None: all of them)."""
    from seap.evaluation.perplexity import wikitext_stream

    text, _ = wikitext_stream(DATA)
    start, _, size = WIKITEXT_TAIL
    tail = text[int(start * len(text)):]
    return [tail[i * size:(i + 1) * size] for i in range(len(tail) // size if n is None else min(n, len(tail) // size))]


UNKNOWN_ITEMS = 300  # prompts of each kind the router never saw


def unknown_pairs() -> dict[str, list[tuple[str, str]]]:
    """(prompt, reference answer) of the kinds the router never saw: GSM8K test questions with their gold
    solutions (a seeded subset), XSum 0-shot articles with their reference summaries."""
    from seap.tasks import load_task_corpus

    gsm = load_task_corpus("gsm8k", data_dir=DATA, split="test", limit=UNKNOWN_ITEMS)
    rows = [json.loads(line) for line in (DATA / "xsum" / "xsum_0shot.jsonl").read_text().splitlines()]
    return {"gsm8k (test)": [(p, t[len(p):]) for p, t in zip(gsm.prompts, gsm.texts)],  # a text is prompt + answer
            "xsum (0-shot prompts)": [(r["article"], " " + r["summary_gt"].strip()) for r in rows[:UNKNOWN_ITEMS]]}


def wikitext_stats(lm, model_name: str):
    from seap.calibration.layerwise import collect_stats
    from seap.calibration.stats import ActivationStats

    path = CACHE / model_name / "stats" / "wikitext2_tail.safetensors"
    if path.is_file():
        return ActivationStats.load(path)
    s = collect_stats(lm.model, lm.tokenizer, lm.adapter, wikitext_tail(), batch_size=8, max_length=512,
                      meta={"corpus": "wikitext2-tail"}, progress=False)
    s.save(path)
    return s


def reconstruct_row(lm, plan, cfg, protocol: str):
    """Refit the experts a row evaluates, each on the calibration text its channels came from; a
    task-expert plan as `seap prune` refits it (each task expert on its task, the generic expert, which
    scores perplexity, on all the text)."""
    from seap.pruning.plan import GENERIC
    from seap.pruning.prune import expert_corpora
    from seap.pruning.refit_pass import error_summary, reconstruct_plan

    limit = CALIBRATION_LIMIT.get(lm.source.model_id, 400)
    texts, members = expert_corpora(plan, (*TASKS, LM_CORPUS), data_dir=DATA, limit=limit, seed=0)
    if protocol == "task":
        members.pop(LM_CORPUS, None)  # the language-modelling text's own expert: no row evaluates it
    else:  # one expert from all the text pooled: the baselines' "all", or the generic
        pooled = [x for v in texts.values() for x in v]
        texts, members = {GENERIC if protocol == "generic" else "all": pooled}, None
    t0 = time.time()
    plan = reconstruct_plan(lm, plan, texts, cfg.refit.resolved(lm.adapter, lm.model.config), members=members,
                            batch_size=8, max_length=512, progress=False)
    plan.meta.extra["reconstruction"] = {"seconds": round(time.time() - t0, 1),
                                   "errors": {n: error_summary(plan.experts[n]) for n in members or texts}}
    return plan


# Perplexity subsets per model: Gemma 3's 262k-entry vocabulary makes every scored token ~5x dearer.
PPL = {"smollm2-135m": (16, 2), "gemma3-270m": (8, 1)}  # (1024-token windows, WikiText articles)


def eval_config(model_name: str, limit: int):
    from seap import EvalConfig

    windows, docs = PPL.get(model_name, (16, 2))
    return EvalConfig(tasks=TASKS, data_dir=str(DATA), limit=limit, batch_size=16, max_length=2048,
                      ppl_window=1024, ppl_windows=windows, word_ppl_docs=docs)




def read_result(path: Path) -> dict | None:
    """A stage's results file, or None before the stage has run."""
    return json.loads(path.read_text()) if path.is_file() else None


def finished(path: Path, limit: int | None) -> bool:
    """Whether a results file exists and was measured on `limit` items per task (else: measure again)."""
    data = read_result(path)
    return data is not None and data.get("eval_config", {}).get("limit") == limit


def paired_delta(row: dict, dense: dict, tasks=TASKS) -> tuple[float, float]:
    """Average over tasks of (row - dense) on the paper metric, and its paired standard error.

    The same items are scored for both, so the per-item differences carry the comparison's noise
    (much less than two independent errors would). Rows of different N pair on their common first
    items (lm-eval's --limit N scores the first N of a split, so those are the same items)."""
    deltas, variances = [], []
    for task in tasks:
        a, b = row["items"].get(task), dense["items"].get(task)
        if not a or not b:
            continue
        a, b = a[:min(len(a), len(b))], b[:min(len(a), len(b))]
        d = [x - y for x, y in zip(a, b)]
        n = len(d)
        mean = sum(d) / n
        deltas.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    k = len(deltas)
    return sum(deltas) / k, math.sqrt(sum(variances)) / k


def common_averages(row: dict, ref: dict, tasks=TASKS) -> tuple[float, float, int]:
    """The six-task averages of two rows on the items both scored (the first N of each task, as lm-eval's
    --limit takes them), and that N: rows measured at different N compare on their common items."""
    a, b, n = [], [], None
    for task in tasks:
        x, y = row["items"].get(task), ref["items"].get(task)
        if not x or not y:
            continue
        k = min(len(x), len(y))
        a.append(sum(x[:k]) / k)
        b.append(sum(y[:k]) / k)
        n = k if n is None else max(n, k)
    return sum(a) / len(a), sum(b) / len(b), n or 0

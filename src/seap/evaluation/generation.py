"""Generation quality (docs/design.md §4): XSum summaries scored with ROUGE-1/2/L, greedy, stop at "###",
on the dense model, a pruned one, or GRIFFIN experts; and GRIFFIN's classification mode for
log-likelihood tasks.

The XSum prompts are HELM-style rows (`article` holds the whole prompt, ending "Summarize the
above article in 1 sentences.", with `summary_gt`, `max_tokens` and `stop`), as in the GRIFFIN
authors' files; `../shared/data/xsum` holds a copy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..inference.griffin import GriffinConfig
from ..model.loading import LoadedModel

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def load_xsum(data_dir: str | Path, shots: int = 0, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of <data_dir>/xsum/xsum_<shots>shot.jsonl."""
    path = Path(data_dir) / "xsum" / f"xsum_{shots}shot.jsonl"
    if not path.is_file():
        raise DataError(f"no XSum prompts at {path}: pass --data-dir with an xsum/ folder (e.g. ../shared/data) "
                        "holding xsum_0shot.jsonl / xsum_1shot.jsonl")
    rows = []
    try:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("article"), str) or not isinstance(row.get("summary_gt"), str):
                raise DataError(f"{path} line {i + 1} lacks the 'article' or 'summary_gt' string")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not JSON lines ({err}): restore the file") from None
    if not rows:
        raise DataError(f"{path} holds no prompts")
    return rows


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-item ROUGE F-measures (rouge-score, Porter stemming, as HELM and GRIFFIN report)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        for k in ROUGE_KEYS:
            out[k].append(s[k].fmeasure)
    return out


@dataclass
class GenerationReport:
    label: str
    n: int
    rouge: dict[str, float]  # mean F-measure per key (0..1)
    stderr: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"label": self.label, "n": self.n, "rouge": self.rouge, "stderr": self.stderr, "items": self.items,
                "samples": self.samples, "meta": self.meta}


def evaluate_xsum(lm: LoadedModel, *, data_dir: str | Path, limit: int | None = 200, shots: int = 0,
                  batch_size: int = 8, density: float | GriffinConfig | None = None, max_new_tokens: int | None = None,
                  label: str = "model", progress: bool = True, shared: bool = False,
                  chat: bool = False) -> GenerationReport:
    """Greedy summaries of the first `limit` XSum prompts (batched by length, left-padded), each cut
    at the row's stop strings, scored against the reference with ROUGE-1/2/L. With GRIFFIN
    (`density`) and `shared`, each batch decodes through one expert chosen for all its prompts.
    `chat`: each prompt as a user turn of the chat template (GRIFFIN's protocol is the raw prompt)."""
    from ..inference.decoding import generate_texts
    from ..inference.griffin import GriffinSelection, griffin_prior
    from ..model.loading import chat_prompts

    griffin = None
    if density is not None:  # a float: the paper's pure GRIFFIN; a GriffinConfig: as it says
        griffin = density if isinstance(density, GriffinConfig) else GriffinConfig(density, shared=shared,
                                                                                  short="none")
        shared = griffin.shared
    elif shared:
        raise ConfigError("shared batch experts are GRIFFIN's: give a density too")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    rows = load_xsum(data_dir, shots, limit)
    tok = lm.tokenizer
    prior = griffin_prior(lm) if griffin is not None and griffin.short == "prior" and not griffin.pure else None
    prompts, templated = chat_prompts(tok, [r["article"] for r in rows], chat)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])  # similar lengths share a batch: less padding
    preds: list[str] = [""] * len(rows)
    kept, union = [], []
    t0 = time.time()
    for start in tqdm(range(0, len(order), batch_size), desc=f"xsum {label}", disable=not progress):
        idx = order[start:start + batch_size]
        new = max_new_tokens or max(int(rows[i].get("max_tokens", 64)) for i in idx)
        stop = sorted({s for i in idx for s in rows[i].get("stop", ["###"])})
        sel = None if griffin is None else GriffinSelection(lm.adapter, griffin, prior)
        texts, out = generate_texts(lm, [prompts[i] for i in idx], new, selection=sel, stop=stop,
                                    special_tokens=not templated)
        kept.append(out.stats.get("kept_fraction", 1.0))  # the model as it is: all of its FFN
        union.append(out.stats.get("union_fraction", 1.0))
        for i, t in zip(idx, texts):
            preds[i] = t.strip()
    items = rouge_scores(preds, [r["summary_gt"] for r in rows])
    n = len(rows)
    mean = {k: sum(v) / n for k, v in items.items()}
    se = {k: (math.sqrt(sum((x - mean[k]) ** 2 for x in v) / (n - 1) / n) if n > 1 else 0.0) for k, v in items.items()}
    samples = [{"reference": rows[i]["summary_gt"], "prediction": preds[i]} for i in range(min(3, n))]
    meta = {"shots": shots, "batch_size": batch_size, "density": None if griffin is None else griffin.density,
            "griffin": None if griffin is None else griffin.label, "chat_template": templated,
            "batch_experts": ("shared" if shared else "per sequence") if density is not None else None,
            "seconds": round(time.time() - t0, 1),
            "kept_fraction": sum(kept) / len(kept), "union_fraction": sum(union) / len(union),
            "mean_prompt_tokens": sum(lengths) / n}
    return GenerationReport(label, n, mean, se, items, samples, meta)


def make_classification_lm(lm: LoadedModel, density: float, max_length: int | None = None):
    """An lm-eval model scoring with GRIFFIN's classification mode. Batch size 1: lm-eval pads
    without a mask, and the mode needs each sequence's last real token."""
    from lm_eval.models.huggingface import HFLM

    from ..inference.griffin import GriffinConfig, classification_mode

    GriffinConfig(density=density, mode="class")

    class GriffinClassLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            with classification_mode(lm.model, lm.adapter, density):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    return GriffinClassLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1, max_length=max_length)

"""The task registry: every benchmark task seap knows, in one table.

A `TaskSpec` says where a task's rows live (hub path, splits, the data folder of a local copy), how a
row becomes (prompt, gold answer) as lm-evaluation-harness's ``doc_to_text`` and target write them,
which lm-eval task YAML scores it and with which metric it enters the paper's average. Every task
list in seap (the six-task suite, the scored tasks, the calibration tasks) is derived from `TASKS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

Row = Mapping[str, Any]


# --------------------------------------------------------------------------- task formats


def _choice_text(choices: Row, key: Any) -> str:
    """Gold choice of an ARC/OpenBookQA row; labels may be letters or digits ("1".."4")."""
    labels, texts = list(choices["label"]), list(choices["text"])
    key = str(key).strip()  # lm-eval strips answerKey (openbookqa: answerKey.lstrip())
    if key not in labels or labels.index(key) >= len(texts):
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    return texts[labels.index(key)]


def _piqa(row: Row) -> tuple[str, str]:
    label = row["label"]
    if label not in (0, 1):  # the hub test split has label -1 (no gold)
        raise ValueError(f"label {label!r} is not 0 or 1")
    return f"Question: {row['goal']}\nAnswer:", " " + (row["sol1"], row["sol2"])[label]


def _boolq(row: Row) -> tuple[str, str]:
    # google/boolq has a bool `answer`; super_glue/boolq (lm-eval's source) has int `label`.
    gold = row["answer"] if "answer" in row else row.get("label")
    if gold not in (True, False):
        raise ValueError(f"answer {gold!r} is not a boolean")
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", " yes" if gold else " no"


def _arc(row: Row) -> tuple[str, str]:
    gold = _choice_text(row["choices"], row["answerKey"])
    return f"Question: {row['question']}\nAnswer:", " " + gold


def _openbookqa(row: Row) -> tuple[str, str]:
    return row["question_stem"], " " + _choice_text(row["choices"], row["answerKey"])


def _winogrande(row: Row) -> tuple[str, str]:
    """lm-eval's partial evaluation: context up to the blank with the gold option, then the rest."""
    gold = str(row["answer"]).strip()
    if gold not in ("1", "2"):  # the hub test split has answer ""
        raise ValueError(f"answer {gold!r} is not '1' or '2'")
    sentence = row["sentence"]
    idx = sentence.index("_")  # ValueError (skipped as malformed) when there is no blank
    prompt, rest = sentence[:idx] + row["option" + gold], sentence[idx + 1 :]
    if not rest[:1].isspace():
        # Blank glued to the next word ("_'s"): keep that word in the prompt so the answer
        # still starts at a word boundary and prompt + answer reads as the filled sentence.
        glued = re.match(r"\S*", rest).group()  # type: ignore[union-attr]
        prompt, rest = prompt + glued, rest[len(glued) :]
    rest = rest.strip()  # as lm-eval's partial_target; collapses a doubled space after "_"
    if not rest:
        raise ValueError("nothing follows the blank")
    return prompt, " " + rest


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: brackets are WikiHow artifacts.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Row) -> tuple[str, str]:
    label = str(row["label"]).strip()
    if not label.isdigit() or int(label) >= len(row["endings"]):  # test split: label ""
        raise ValueError(f"label {label!r} does not index an ending")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    prompt = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return prompt, " " + _hellaswag_clean(row["endings"][int(label)])


def _gsm8k(row: Row) -> tuple[str, str]:
    answer = row["answer"]
    if "####" not in answer:  # every gold solution ends with "#### <number>"
        raise ValueError("answer has no '#### <number>' line")
    return f"Question: {row['question']}\nAnswer:", " " + answer


def _mmlu(row: Row) -> tuple[str, str]:
    choices, gold = list(row["choices"]), row["answer"]
    if isinstance(gold, str) and gold in ("A", "B", "C", "D"):
        gold = "ABCD".index(gold)
    if len(choices) != 4 or not isinstance(gold, int) or not 0 <= gold < 4:
        raise ValueError(f"answer {gold!r} with {len(choices)} choices is not a valid gold")
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", choices))
    return f"{row['question'].strip()}{options}\nAnswer:", " " + "ABCD"[gold]


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live and how a row becomes (prompt, gold answer)."""

    name: str
    hub_path: str
    hub_name: str | None
    splits: tuple[str, ...]  # labelled splits only: unlabelled test splits cannot calibrate
    calibration_split: str
    eval_split: str  # the split lm-evaluation-harness scores
    to_example: Callable[[Row], tuple[str, str]] | None  # None for raw LM text
    columns: tuple[str, ...]  # checked once up front, so a KeyError later means a bad row
    text_column: str | None = None  # raw text stream column (wikitext2)
    lm_eval_task: str | None = None  # the shipped lm-eval YAML that scores it (evaluation/lm_eval_tasks)
    metric: str | None = None  # its metric in the paper's average (acc_norm where length-normalised)
    in_suite: bool = False  # one of the six tasks of the paper's table
    folder: str | None = None  # the folder of a local copy under --data-dir (default: the name)

    @property
    def data_folder(self) -> str:
        return self.folder or self.name


_ARC_COLS = ("question", "choices", "answerKey")
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("piqa", "baber/piqa", None, ("train", "validation"), "train", "validation",
                 _piqa, ("goal", "sol1", "sol2", "label"),
                 lm_eval_task="piqa", metric="acc_norm", in_suite=True),
        TaskSpec("boolq", "google/boolq", None, ("train", "validation"), "train", "validation",
                 _boolq, ("question", "passage"),
                 lm_eval_task="boolq", metric="acc", in_suite=True),
        TaskSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test"),
                 "train", "test", _arc, _ARC_COLS,
                 lm_eval_task="arc_easy", metric="acc", in_suite=True),
        TaskSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge",
                 ("train", "validation", "test"), "train", "test", _arc, _ARC_COLS,
                 lm_eval_task="arc_challenge", metric="acc_norm", in_suite=True),
        TaskSpec("openbookqa", "allenai/openbookqa", "main", ("train", "validation", "test"),
                 "train", "test", _openbookqa, ("question_stem", "choices", "answerKey"),
                 lm_eval_task="openbookqa", metric="acc_norm", in_suite=True),
        TaskSpec("winogrande", "allenai/winogrande", "winogrande_xl", ("train", "validation"),
                 "train", "validation", _winogrande, ("sentence", "option1", "option2", "answer"),
                 lm_eval_task="winogrande", metric="acc", in_suite=True),
        TaskSpec("hellaswag", "Rowan/hellaswag", None, ("train", "validation"), "train",
                 "validation", _hellaswag,
                 ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                 lm_eval_task="hellaswag", metric="acc_norm"),
        TaskSpec("gsm8k", "openai/gsm8k", "main", ("train", "test"), "train", "test",
                 _gsm8k, ("question", "answer")),
        # auxiliary_train is other datasets' questions, so MMLU calibrates from validation.
        TaskSpec("mmlu", "cais/mmlu", "all", ("auxiliary_train", "dev", "validation", "test"),
                 "validation", "test", _mmlu, ("question", "choices", "answer")),
        # test by default: it is the split the offline copy has (and that perplexity is
        # reported on; pass split="train" on the hub to keep calibration disjoint from it).
        TaskSpec("wikitext2", "wikitext", "wikitext-2-raw-v1", ("train", "validation", "test"),
                 "test", "test", None, ("text",), text_column="text", lm_eval_task="wikitext"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
# The six tasks of the paper's table, in its order: the default of `seap eval` and the benchmarks.
SUITE: tuple[str, ...] = tuple(n for n, s in TASKS.items() if s.in_suite)
# lm-eval task name -> spec, for every task seap scores (accuracy tasks and word perplexity)
EVAL_TASKS: dict[str, TaskSpec] = {s.lm_eval_task: s for s in TASKS.values() if s.lm_eval_task}
ACCURACY_TASKS: tuple[str, ...] = tuple(n for n, s in EVAL_TASKS.items() if s.metric)
PAPER_METRIC: dict[str, str] = {n: s.metric for n, s in EVAL_TASKS.items() if s.metric}

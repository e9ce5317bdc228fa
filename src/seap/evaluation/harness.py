"""Zero-shot accuracy and word perplexity through lm-evaluation-harness (docs/design.md §4).

seap ships the upstream task YAMLs (prompts, choices, metrics) in `lm_eval_tasks/`. They read
the Hugging Face hub as they are; with a data folder they are rewritten into a temporary
folder whose `dataset_path` is `parquet`/`json` with `data_files` pointing to the local copies,
so the same YAML text serves `seap eval` and the `lm_eval` CLI (`--include_path`).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ConfigError, DataError
from ..tasks import ACCURACY_TASKS, EVAL_TASKS, PAPER_METRIC, local_file

log = logging.getLogger(__name__)

WORD_PPL_TASK = next(n for n, s in EVAL_TASKS.items() if not s.metric)  # "wikitext"
_SPLIT_KEYS = ("training_split", "validation_split", "test_split")
_UTILS = "seap_task_utils.py"


def yaml_source(task: str) -> str:
    if task not in (*ACCURACY_TASKS, WORD_PPL_TASK):
        raise ConfigError(f"unknown evaluation task {task!r}: choose from "
                          f"{', '.join(ACCURACY_TASKS)} (accuracy) or {WORD_PPL_TASK} (word perplexity)")
    return resources.files(__package__).joinpath("lm_eval_tasks", f"{task}.yaml").read_text(encoding="utf-8")


def _split_value(line: str) -> str | None:
    value = line.split(":", 1)[1].strip()
    return None if value in ("null", "") else value


def localize_yaml(text: str, task: str, data_dir: str | Path) -> tuple[str, str]:
    """Point a task YAML at local files; return (yaml text, the split that will be scored).

    Splits absent from the folder are set to null, so lm-eval scores the split that exists
    (ARC and OpenBookQA score `test` upstream, but the offline copies have `validation`).
    """
    folder = EVAL_TASKS[task].data_folder
    lines, files, kept = [], {}, {}
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if key in _SPLIT_KEYS:
            split = _split_value(line)
            path = None
            if split is not None:
                try:
                    path = local_file(data_dir, folder, split)
                except DataError:
                    if not Path(data_dir, folder).is_dir():
                        raise
            if path is None:
                line = f"{key}: null"
            else:
                files[split] = path
            kept[key] = split if path is not None else None
        elif key == "dataset_path":
            line = "dataset_path: __LOCAL__"
        elif key == "dataset_name":
            line = "dataset_name: null"
        lines.append(line)
    scored = kept.get("test_split") or kept.get("validation_split")
    if scored is None:
        raise DataError(f"{Path(data_dir) / folder} has none of the splits {task} is scored on: add "
                        "validation.parquet (or test.parquet) in the Hugging Face row layout")
    kinds = {"json" if p.suffix in (".json", ".jsonl") else "parquet" for p in files.values()}
    if len(kinds) > 1:
        raise DataError(f"{Path(data_dir) / folder} mixes parquet and json splits: use one format")
    out = "\n".join(lines).replace("__LOCAL__", kinds.pop())
    out += "\ndataset_kwargs:\n  data_files:\n" + "".join(
        f"    {split}: {str(path.resolve())!r}\n" for split, path in files.items())
    return out, scored


def scored_split(task: str, data_dir: str | Path | None) -> str:
    text = yaml_source(task)
    if data_dir is not None:
        return localize_yaml(text, task, data_dir)[1]
    values = {ln.split(":", 1)[0]: _split_value(ln) for ln in text.splitlines() if ln.split(":", 1)[0] in _SPLIT_KEYS}
    return values.get("test_split") or values["validation_split"]


def write_task_folder(tasks: Sequence[str], data_dir: str | Path | None, dest: str | Path) -> dict[str, str]:
    """Write the YAMLs of `tasks` (localised when data_dir is given) and their helper module to dest.

    `lm_eval --include_path dest --tasks piqa,...` then runs exactly what `seap eval` runs.
    Returns the scored split of each task.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    splits = {}
    for task in tasks:
        text = yaml_source(task)
        if data_dir is not None:
            text, splits[task] = localize_yaml(text, task, data_dir)
        else:
            splits[task] = scored_split(task, None)
        (dest / f"{task}.yaml").write_text(text, encoding="utf-8")
    utils = resources.files(__package__).joinpath("lm_eval_tasks", _UTILS)
    (dest / _UTILS).write_text(utils.read_text(encoding="utf-8"), encoding="utf-8")
    return splits


@contextmanager
def _task_folder(tasks: Sequence[str], data_dir: str | Path | None) -> Iterator[tuple[Path, dict[str, str]]]:
    tmp = Path(tempfile.mkdtemp(prefix="seap-tasks-"))
    try:
        yield tmp, write_task_folder(tasks, data_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class TaskScore:
    """One task's result: metric -> value and standard error, items scored, split."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    split: str

    @property
    def paper(self) -> float | None:
        return self.metrics.get(PAPER_METRIC.get(self.task, ""))

    @property
    def paper_stderr(self) -> float | None:
        return self.stderr.get(PAPER_METRIC.get(self.task, ""))

    def to_dict(self) -> dict:
        return {"task": self.task, "metrics": self.metrics, "stderr": self.stderr, "n": self.n, "split": self.split,
                "paper_metric": PAPER_METRIC.get(self.task), "paper": self.paper}


def make_lm(model, tokenizer, batch_size: int = 16, max_length: int | None = None, *, exact: bool = False):
    """lm-eval's model around an in-memory model (no reload, no copy): HFLM with the LM head applied
    at the scored positions only (seap.evaluation.scorer, same numbers), or HFLM itself (`exact`)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ConfigError("evaluation needs lm-evaluation-harness: pip install 'seap[eval]'") from err
    from .scorer import SelectiveHFLM

    cls = HFLM if exact else SelectiveHFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate_tasks(lm, tasks: Sequence[str], *, data_dir: str | Path | None = None, limit: int | None = None,
                   log_samples: bool = False) -> tuple[dict[str, TaskScore], dict[str, list]]:
    """Run lm-eval's `simple_evaluate` on seap's task YAMLs; returns scores and (optionally) per-item
    correctness (task -> list of 0/1 on the paper metric, in document order)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a whole number >= 1, got {limit!r}")
    tasks = list(dict.fromkeys(tasks))
    for t in tasks:
        yaml_source(t)
    with _task_folder(tasks, data_dir) as (folder, splits):
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        try:
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                  log_samples=log_samples, bootstrap_iters=1000)
        except (FileNotFoundError, ConnectionError) as err:
            raise DataError(f"lm-eval could not read the task data ({str(err).splitlines()[0][:200]}): pass "
                            "--data-dir with local copies (e.g. ../shared/data) when there is no network") from err
    scores, items = {}, {}
    for task in tasks:
        res = out["results"][task]
        metrics = {k.split(",")[0]: float(v) for k, v in res.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        stderr = {k.split(",")[0].replace("_stderr", ""): float(v) for k, v in res.items()
                  if "_stderr," in k and isinstance(v, (int, float))}
        n = int(out["n-samples"][task]["effective"])
        scores[task] = TaskScore(task, metrics, stderr, n, splits[task])
        if log_samples and task in PAPER_METRIC:
            metric = PAPER_METRIC[task] if PAPER_METRIC[task] in metrics else "acc"
            docs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            items[task] = [int(s[metric]) for s in docs]
    return scores, items


def paper_average(scores: dict[str, TaskScore]) -> tuple[float, float] | None:
    """Mean of the paper metric over the accuracy tasks, with its standard error (tasks independent)."""
    vals = [(s.paper, s.paper_stderr or 0.0) for t, s in scores.items() if t in PAPER_METRIC and s.paper is not None]
    if not vals:
        return None
    n = len(vals)
    return sum(v for v, _ in vals) / n, math.sqrt(sum(e * e for _, e in vals)) / n

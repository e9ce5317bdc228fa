"""Task corpora: the calibration texts whose activation statistics drive pruning.

A corpus comes from a benchmark task (Hugging Face hub, or a local copy laid out as
``<data_dir>/<task>/<split>.parquet|.jsonl|.json``; this module), from the small corpus embedded in
the package, or from a user file (`files`); `resolve_corpus` turns a name into one. Task prompts reproduce lm-evaluation-harness's ``doc_to_text``
and gold target (`seap.tasks.specs`) so that a calibration text is exactly what the model sees
when scored.
"""


from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError
from .corpus import SPEC_HELP, Corpus, Example, check_limit, make_corpus, unknown_name
from .files import load_default_corpus, load_file_corpus
from .specs import TASK_NAMES, TASKS, Row, TaskSpec

log = logging.getLogger(__name__)

_LOCAL_EXTS = (".parquet", ".jsonl", ".json")  # preference order when a split has several


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the 'Generating split' bars of local loads, restoring the caller's setting."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- task corpora


def local_file(data_dir: str | Path, task: str, split: str) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist: pass --data-dir pointing to a folder with "
            "<task>/<split>.parquet files, or omit it to load from the Hugging Face hub"
        )
    folder = root / task
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"data folder {root} has no {task}/ folder (it has: {', '.join(have) or 'nothing'}): "
            f"add {task}/<split>.parquet there, or omit --data-dir to load {task} from the hub"
        )
    for ext in _LOCAL_EXTS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    files = sorted(p.name for p in folder.iterdir())
    splits = sorted({p.stem for p in folder.iterdir() if p.suffix in _LOCAL_EXTS})
    raise DataError(
        f"no {split!r} split of {task} in {folder} (files there: {', '.join(files) or 'none'}): "
        f"pass --split with one of {', '.join(splits) or '(none)'}, or add {split}.parquet"
    )


def load_rows(spec: TaskSpec, split: str, data_dir: str | Path | None) -> tuple[Any, str]:
    """Load one split as a ``datasets.Dataset``; return it with its source label."""
    import datasets

    if data_dir is not None:
        path = local_file(data_dir, spec.data_folder, split)
        source = f"local:{path.resolve()}"
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json",
                                           data_files={"train": str(path)}, split="train")
        except Exception as err:  # any reader failure is a bad file from the user's side
            raise DataError(
                f"cannot read {path} ({_first_line(err)}): it must be a valid "
                f"{path.suffix[1:]} file in the row layout of the hub dataset {spec.hub_path}"
            ) from err
    else:
        if split not in spec.splits:
            raise DataError(
                f"{spec.name} has no labelled split {split!r} on the hub: pass --split with one "
                f"of {', '.join(spec.splits)}"
            )
        config = f"/{spec.hub_name}" if spec.hub_name else ""
        source = f"hub:{spec.hub_path}{config}:{split}"
        try:
            ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)
        except Exception as err:  # network, auth and missing-dataset errors all land here
            raise DataError(
                f"cannot load {spec.hub_path}{config} split {split} from the Hugging Face hub "
                f"({_first_line(err)}): check the network (and HF_TOKEN), or pass --data-dir "
                "with local copies laid out as <task>/<split>.parquet"
            ) from err
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source} lacks columns {missing} (it has {ds.column_names}): the file must keep "
            f"the row layout of the hub dataset {spec.hub_path}"
        )
    return ds, source


def _chunk_stream(raw: str, min_chars: int = 1200, max_chars: int = 2000) -> list[str]:
    """Cut a raw LM text stream into ~min..max-character texts on line (paragraph) ends.

    Lossless: ``"".join`` of the result (whitespace-only pieces aside) is ``raw``. A line
    longer than ``max_chars`` is cut after sentence ends so one paragraph is not one text.
    """
    units: list[str] = []
    for line in raw.splitlines(keepends=True):
        if len(line) > max_chars:
            units.extend(p for p in re.split(r"(?<=[.!?] )", line) if p)
        else:
            units.append(line)
    chunks, cur, has_body = [], "", False
    for unit in units:
        heading = unit.lstrip().startswith("= ")
        # Flush before overflowing, unless cur is only headings: they belong with what follows.
        if has_body and len(cur) + len(unit) > max_chars:
            chunks.append(cur)
            cur, has_body = "", False
        cur += unit
        has_body = has_body or (bool(unit.strip()) and not heading)
        if len(cur) >= min_chars and not heading:
            chunks.append(cur)
            cur, has_body = "", False
    chunks.append(cur)
    return [c for c in chunks if c.strip()]


def _task_examples(spec: TaskSpec, rows: Sequence[Row], where: str) -> list[Example]:
    """Format rows; rows with a malformed gold answer are skipped and counted, not fatal."""
    if spec.text_column is not None:
        raw = "".join(r[spec.text_column] or "" for r in rows)
        return [(chunk, None) for chunk in _chunk_stream(raw)]
    assert spec.to_example is not None
    examples: list[Example] = []
    skipped, first_reason = 0, ""
    for i, row in enumerate(rows):
        try:
            prompt, answer = spec.to_example(row)
        except (ValueError, TypeError, IndexError, KeyError) as err:
            skipped, first_reason = skipped + 1, first_reason or f"row {i}: {err}"
            continue
        examples.append((prompt + answer, prompt))
    if skipped:
        log.warning("%s: skipped %d of %d rows with a malformed gold answer (first: %s)",
                    where, skipped, len(rows), first_reason)
    return examples


def corpus_from_rows(name: str, rows: Sequence[Row], *, source: str = "memory",
                     limit: int | None = None, seed: int = 0) -> Corpus:
    """Build task ``name``'s corpus from rows already in memory (Hugging Face layout)."""
    spec = task_spec(name)
    check_limit(limit, seed)
    examples = _task_examples(spec, rows, source)
    if not examples:
        raise DataError(
            f"{spec.name} from {source} gave no usable examples ({len(rows)} rows, none with a "
            "valid gold answer): use a labelled split (unlabelled test splits cannot calibrate)"
        )
    return make_corpus(spec.name, examples, source, limit, seed)


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(str(name).strip().lower())
    if spec is None:
        raise unknown_name("task", str(name), TASK_NAMES, SPEC_HELP)
    return spec


def load_task_corpus(name: str, *, data_dir: str | Path | None = None, split: str | None = None,
                     limit: int | None = None, seed: int = 0) -> Corpus:
    """Load a benchmark task's calibration corpus from ``data_dir`` or the hub."""
    spec = task_spec(name)
    check_limit(limit, seed)
    ds, source = load_rows(spec, split or spec.calibration_split, data_dir)
    return corpus_from_rows(spec.name, ds.to_list(), source=source, limit=limit, seed=seed)


# --------------------------------------------------------------------------- resolution


def resolve_corpus(spec: str, *, data_dir: str | Path | None = None, split: str | None = None,
                   limit: int | None = None, seed: int = 0) -> Corpus:
    """Turn a user's corpus spec (task, default[:family] or file path) into a Corpus."""
    text = str(spec).strip()
    key = text.lower()
    if not text:
        raise DataError(f"empty corpus name: {SPEC_HELP}")
    if key in TASKS:
        return load_task_corpus(key, data_dir=data_dir, split=split, limit=limit, seed=seed)
    if key == "default":
        return load_default_corpus(limit=limit, seed=seed)
    if key.startswith("default:"):
        return load_default_corpus(text.split(":", 1)[1], limit=limit, seed=seed)
    path = Path(text).expanduser()
    # Anything that looks like a path goes to the file loader, whose errors are specific.
    if path.suffix or path.exists() or "/" in text or "\\" in text:
        return load_file_corpus(path, limit=limit, seed=seed)
    raise unknown_name("task or corpus", text, (*TASK_NAMES, "default"), SPEC_HELP)


def check_corpus_spec(spec: str, *, data_dir: str | Path | None = None) -> None:
    """Refuse a corpus spec that resolve_corpus would refuse, before a model is loaded for it: names and
    files are checked now (cheap); a task's data is read when it is used."""
    if str(spec).strip().lower() in TASKS:
        return
    resolve_corpus(spec, data_dir=data_dir)  # 'default[:family]' (embedded) or a file: cheap to read

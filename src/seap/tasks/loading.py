"""Task corpora: the calibration texts whose activation statistics drive pruning.

A corpus comes from a benchmark task (Hugging Face hub, or a local copy laid out as
``<data_dir>/<task>/<split>.parquet|.jsonl|.json``), from the small corpus embedded in the
package, or from a user file. Task prompts reproduce lm-evaluation-harness's ``doc_to_text``
and gold target (`seap.tasks.specs`) so that a calibration text is exactly what the model sees
when scored.
"""


from __future__ import annotations

import difflib
import json
import logging
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ConfigError, DataError
from .specs import TASK_NAMES, TASKS, Row, TaskSpec

log = logging.getLogger(__name__)

# (text, prompt or None): None marks pure LM text, which contributes no router prompt.
_Example = tuple[str, str | None]


@dataclass(frozen=True)
class Corpus:
    """Calibration texts of one task or family, with their bare prompts and origin."""

    name: str
    texts: tuple[str, ...]
    prompts: tuple[str, ...] = ()
    source: str = "memory"

    def __post_init__(self) -> None:
        # Callers may pass lists; store tuples so the frozen corpus is truly immutable.
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.texts:
            raise DataError(
                f"corpus {self.name!r} ({self.source}) has no texts: give it at least one "
                "non-empty text (check the file or split, and that --limit is at least 1)"
            )
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"corpus {self.name!r} ({self.source}) text #{i} is empty or not a string: "
                    "drop empty rows from the corpus"
                )

    def __len__(self) -> int:
        return len(self.texts)


DEFAULT_CORPORA: tuple[str, ...] = (
    "science_qa", "physical_commonsense", "reading_yesno", "math_word", "general_text",
)
_LOCAL_EXTS = (".parquet", ".jsonl", ".json")  # preference order when a split has several
_FILE_EXTS = (".txt", ".jsonl", ".json")
_SPEC_HELP = (
    f"use a task name ({', '.join(TASK_NAMES)}), 'default', 'default:<family>' "
    f"({', '.join(DEFAULT_CORPORA)}), or a path to a .txt/.jsonl/.json corpus file"
)




# --------------------------------------------------------------------------- helpers


def _check_limit(limit: int | None, seed: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(
            f"limit must be a whole number >= 1, got {limit!r}: pass --limit N with N >= 1, "
            "or leave it out to use every example"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}: pass --seed N")


def _pick(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """First ``limit`` items of a seeded shuffle, returned in their original order.

    Original order keeps output stable and makes a smaller limit a subset of a larger one.
    """
    if limit is None or limit >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def _make_corpus(name: str, examples: Sequence[_Example], source: str,
                 limit: int | None, seed: int) -> Corpus:
    chosen = _pick(examples, limit, seed)
    return Corpus(name=name, texts=tuple(t for t, _ in chosen),
                  prompts=tuple(p for _, p in chosen if p is not None), source=source)


def _unknown(kind: str, name: str, known: Iterable[str], fix: str) -> DataError:
    close = difflib.get_close_matches(name.lower(), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"unknown {kind} {name!r}{hint}: {fix}")


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


def _task_examples(spec: TaskSpec, rows: Sequence[Row], where: str) -> list[_Example]:
    """Format rows; rows with a malformed gold answer are skipped and counted, not fatal."""
    if spec.text_column is not None:
        raw = "".join(r[spec.text_column] or "" for r in rows)
        return [(chunk, None) for chunk in _chunk_stream(raw)]
    assert spec.to_example is not None
    examples: list[_Example] = []
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
    _check_limit(limit, seed)
    examples = _task_examples(spec, rows, source)
    if not examples:
        raise DataError(
            f"{spec.name} from {source} gave no usable examples ({len(rows)} rows, none with a "
            "valid gold answer): use a labelled split (unlabelled test splits cannot calibrate)"
        )
    return _make_corpus(spec.name, examples, source, limit, seed)


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(str(name).strip().lower())
    if spec is None:
        raise _unknown("task", str(name), TASK_NAMES, _SPEC_HELP)
    return spec


def load_task_corpus(name: str, *, data_dir: str | Path | None = None, split: str | None = None,
                     limit: int | None = None, seed: int = 0) -> Corpus:
    """Load a benchmark task's calibration corpus from ``data_dir`` or the hub."""
    spec = task_spec(name)
    _check_limit(limit, seed)
    ds, source = load_rows(spec, split or spec.calibration_split, data_dir)
    return corpus_from_rows(spec.name, ds.to_list(), source=source, limit=limit, seed=seed)


# --------------------------------------------------------------------------- user files


def _json_rows(content: str, where: str) -> Iterator[tuple[str, Any]]:
    """Yield (position, value) for each JSONL line; position names the line in errors."""
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} line {lineno} is not valid JSON ({err.msg} at column {err.colno}): "
                "fix that line; each line must be one JSON object"
            ) from err


def _row_examples(rows: Iterable[tuple[str, Any]], where: str) -> list[_Example]:
    """{"text"} rows are LM text; {"prompt", "answer"} rows are prompt + gold answer."""
    examples: list[_Example] = []
    fix = 'give each row {"text": ...} or {"prompt": ..., "answer": ...}'
    for pos, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where} {pos} is a {type(row).__name__}, not a JSON object: {fix}")
        if "text" in row:
            text, prompt = row["text"], None
        elif "prompt" in row or "answer" in row:
            prompt, answer = row.get("prompt", ""), row.get("answer", "")
            if not isinstance(prompt, str) or not isinstance(answer, str):
                raise DataError(f"{where} {pos}: \"prompt\" and \"answer\" must be strings: {fix}")
            text, prompt = prompt + answer, (prompt if prompt.strip() else None)
        else:
            raise DataError(
                f"{where} {pos} has neither \"text\" nor \"prompt\"/\"answer\" "
                f"(keys: {', '.join(map(str, row)) or 'none'}): {fix}"
            )
        if not isinstance(text, str):
            raise DataError(f"{where} {pos}: \"text\" must be a string: {fix}")
        if text.strip():  # an empty row adds nothing to the statistics; skip it quietly
            examples.append((text, prompt))
    return examples


def _parse_file_content(content: str, ext: str, where: str) -> list[_Example]:
    if ext == ".txt":
        blocks = re.split(r"\n[ \t]*\n", content.replace("\r\n", "\n"))
        return [(b.strip(), None) for b in blocks if b.strip()]
    if ext == ".jsonl":
        return _row_examples(_json_rows(content, where), where)
    try:
        data = json.loads(content) if content.strip() else []
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}): "
            "fix it, or use a .jsonl file with one JSON object a line"
        ) from err
    if not isinstance(data, list):
        raise DataError(f"{where} must hold a JSON list of objects, not a {type(data).__name__}: "
                        'write [{"text": ...}, ...] or use .jsonl')
    return _row_examples(((f"item {i}", r) for i, r in enumerate(data, 1)), where)


def load_file_corpus(path: str | Path, *, limit: int | None = None, seed: int = 0) -> Corpus:
    """Load a user corpus: .txt (blank-line separated texts), .jsonl or .json (list)."""
    _check_limit(limit, seed)
    p = Path(path).expanduser()
    ext = p.suffix.lower()
    if ext not in _FILE_EXTS:
        raise DataError(
            f"unsupported corpus file {p} (extension {ext or 'none'}): use .txt (texts separated "
            'by blank lines), .jsonl (one {"text": ...} or {"prompt": ..., "answer": ...} object '
            "a line) or .json (a list of such objects)"
        )
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"corpus file {p} {what}: check the path, or {_SPEC_HELP}")
    try:
        content = p.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from editors
    except UnicodeDecodeError as err:
        raise DataError(f"corpus file {p} is not UTF-8 text ({err.reason} at byte {err.start}): "
                        "re-save it as UTF-8") from err
    except OSError as err:
        raise DataError(f"cannot read corpus file {p} ({err.strerror}): "
                        "check its permissions") from err
    examples = _parse_file_content(content, ext, f"corpus file {p}")
    if not examples:
        raise DataError(f"corpus file {p} holds no texts: add at least one non-empty text, "
                        "or point to another file")
    return _make_corpus(p.stem, examples, f"file:{p.resolve()}", limit, seed)


# --------------------------------------------------------------------------- embedded corpus


@lru_cache(maxsize=None)  # safe: the files ship with the package and never change at runtime
def _family_examples(family: str) -> tuple[_Example, ...]:
    if family not in DEFAULT_CORPORA:
        raise _unknown("default corpus family", family, DEFAULT_CORPORA,
                       f"use default:<family> with one of {', '.join(DEFAULT_CORPORA)}, "
                       "or 'default' for all of them")
    res = resources.files("seap") / "corpus" / f"{family}.jsonl"
    if not res.is_file():
        raise DataError(f"embedded corpus file seap/corpus/{family}.jsonl is missing: reinstall "
                        "seap, or pass a task name or corpus file instead")
    where = f"embedded corpus {family}.jsonl"
    examples = _row_examples(_json_rows(res.read_text(encoding="utf-8"), where), where)
    if not examples:
        raise DataError(f"{where} holds no texts: reinstall seap")
    return tuple(examples)


def load_default_corpus(family: str | None = None, *, limit: int | None = None,
                        seed: int = 0) -> Corpus:
    """One embedded family, or (``family=None``) all of them merged as corpus "default"."""
    _check_limit(limit, seed)
    if family is None:
        merged = [ex for fam in DEFAULT_CORPORA for ex in _family_examples(fam)]
        return _make_corpus("default", merged, "embedded:default", limit, seed)
    family = family.strip().lower()
    return _make_corpus(family, _family_examples(family), f"embedded:{family}", limit, seed)


def default_corpora() -> dict[str, Corpus]:
    """Every embedded family by name, in ``DEFAULT_CORPORA`` order."""
    return {fam: load_default_corpus(fam) for fam in DEFAULT_CORPORA}


# --------------------------------------------------------------------------- resolution


def resolve_corpus(spec: str, *, data_dir: str | Path | None = None, split: str | None = None,
                   limit: int | None = None, seed: int = 0) -> Corpus:
    """Turn a user's corpus spec (task, default[:family] or file path) into a Corpus."""
    text = str(spec).strip()
    key = text.lower()
    if not text:
        raise DataError(f"empty corpus name: {_SPEC_HELP}")
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
    raise _unknown("task or corpus", text, (*TASK_NAMES, "default"), _SPEC_HELP)

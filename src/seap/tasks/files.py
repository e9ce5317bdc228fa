"""Corpora from files: the user's (.txt, .jsonl, .json) and the small corpus embedded in the package
(JSONL rows of {"text"} or {"prompt", "answer"})."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError
from .corpus import DEFAULT_CORPORA, SPEC_HELP, Corpus, Example, check_limit, make_corpus, unknown_name

_FILE_EXTS = (".txt", ".jsonl", ".json")


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


def _row_examples(rows: Iterable[tuple[str, Any]], where: str) -> list[Example]:
    """{"text"} rows are LM text; {"prompt", "answer"} rows are prompt + gold answer."""
    examples: list[Example] = []
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


def _parse_file_content(content: str, ext: str, where: str) -> list[Example]:
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
    check_limit(limit, seed)
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
        raise DataError(f"corpus file {p} {what}: check the path, or {SPEC_HELP}")
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
    return make_corpus(p.stem, examples, f"file:{p.resolve()}", limit, seed)


# --------------------------------------------------------------------------- embedded corpus


@lru_cache(maxsize=None)  # safe: the files ship with the package and never change at runtime
def _family_examples(family: str) -> tuple[Example, ...]:
    if family not in DEFAULT_CORPORA:
        raise unknown_name("default corpus family", family, DEFAULT_CORPORA,
                           f"use default:<family> with one of {', '.join(DEFAULT_CORPORA)}, "
                           "or 'default' for all of them")
    res = resources.files(__package__) / "embedded" / f"{family}.jsonl"
    if not res.is_file():
        raise DataError(f"embedded corpus file seap/tasks/embedded/{family}.jsonl is missing: reinstall "
                        "seap, or pass a task name or corpus file instead")
    where = f"embedded corpus {family}.jsonl"
    examples = _row_examples(_json_rows(res.read_text(encoding="utf-8"), where), where)
    if not examples:
        raise DataError(f"{where} holds no texts: reinstall seap")
    return tuple(examples)


def load_default_corpus(family: str | None = None, *, limit: int | None = None,
                        seed: int = 0) -> Corpus:
    """One embedded family, or (``family=None``) all of them merged as corpus "default"."""
    check_limit(limit, seed)
    if family is None:
        merged = [ex for fam in DEFAULT_CORPORA for ex in _family_examples(fam)]
        return make_corpus("default", merged, "embedded:default", limit, seed)
    family = family.strip().lower()
    return make_corpus(family, _family_examples(family), f"embedded:{family}", limit, seed)


def default_corpora() -> dict[str, Corpus]:
    """Every embedded family by name, in ``DEFAULT_CORPORA`` order."""
    return {fam: load_default_corpus(fam) for fam in DEFAULT_CORPORA}

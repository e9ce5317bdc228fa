"""A calibration corpus (texts and bare prompts) and the helpers that every corpus source shares."""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, DataError
from .specs import TASK_NAMES

# (text, prompt or None): None marks pure LM text, which contributes no router prompt.
Example = tuple[str, str | None]


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
SPEC_HELP = (
    f"use a task name ({', '.join(TASK_NAMES)}), 'default', 'default:<family>' "
    f"({', '.join(DEFAULT_CORPORA)}), or a path to a .txt/.jsonl/.json corpus file"
)


def check_limit(limit: int | None, seed: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(
            f"limit must be a whole number >= 1, got {limit!r}: pass --limit N with N >= 1, "
            "or leave it out to use every example"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}: pass --seed N")


def pick(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """First ``limit`` items of a seeded shuffle, returned in their original order.

    Original order keeps output stable and makes a smaller limit a subset of a larger one.
    """
    if limit is None or limit >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def make_corpus(name: str, examples: Sequence[Example], source: str,
                limit: int | None, seed: int) -> Corpus:
    chosen = pick(examples, limit, seed)
    return Corpus(name=name, texts=tuple(t for t, _ in chosen),
                  prompts=tuple(p for _, p in chosen if p is not None), source=source)


def unknown_name(kind: str, name: str, known: Iterable[str], fix: str) -> DataError:
    close = difflib.get_close_matches(name.lower(), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"unknown {kind} {name!r}{hint}: {fix}")

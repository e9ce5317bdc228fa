"""What the analyses share: task texts, a hook on every layer's output (through seap.model.hooks), and
writing an analysis (JSON numbers, a Markdown summary, PNG figures) into one output folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .._io import write_json, write_text
from ..model.hooks import observing
from ..errors import ConfigError
from ..model.adapters import Adapter
from ..tasks import DEFAULT_CORPORA, SUITE, resolve_corpus

log = logging.getLogger(__name__)

# The benchmark suite when a data folder is given; the embedded families otherwise.
EMBEDDED = tuple(f"default:{f}" for f in DEFAULT_CORPORA)


def default_tasks(data_dir: str | Path | None) -> tuple[str, ...]:
    return SUITE if data_dir is not None else EMBEDDED


def task_texts(tasks: Sequence[str], *, data_dir: str | Path | None, limit: int | None, seed: int,
               prompts: bool) -> dict[str, list[str]]:
    """Texts of each task corpus: its bare prompts (`prompts=True`, where it has them) or prompt + answer."""
    if not tasks:
        raise ConfigError("give at least one task (--task)")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"a task is named twice in {list(tasks)}: name each once")
    out = {}
    for task in tasks:
        corpus = resolve_corpus(task, data_dir=data_dir, limit=limit, seed=seed)
        out[task] = list(corpus.prompts) if prompts and corpus.prompts else list(corpus.texts)
    return out


def check_positive(**values: int | float | None) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or v < 1):
            raise ConfigError(f"{name.replace('_', ' ')} must be a whole number >= 1, got {v}")


def layer_outputs(model: nn.Module, adapter: Adapter, fn: Callable[[int, torch.Tensor], None], *,
                  raw: bool = False):
    """A context in which fn(layer index, hidden states [B, S, d]) gets every decoder layer's output
    (`raw`: exactly what the layer returned, a tensor or a tuple); hooks removed on exit."""
    return observing(dict(enumerate(adapter.layers(model))), fn, output=True, whole=raw)


def spread_layers(n_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` layers spread over the depth, the last one included (0-based indices)."""
    picks = {round((n_layers - 1) * (i + 1) / count) for i in range(count)}
    return tuple(sorted(picks))


def check_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} does not exist: this model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


@dataclass
class Analysis:
    """One analysis: its numbers (JSON), a Markdown summary and the figures written."""

    name: str
    data: dict
    markdown: str
    files: dict[str, str] = field(default_factory=dict)

    def save(self, out: str | Path, figures: dict[str, Callable[[Path], Path]]) -> None:
        """Write <out>/<name>.json, <name>.md and each figure (atomically, file by file)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            for fname, draw in figures.items():
                self.files[fname] = str(draw(out / fname))
        except ImportError:
            log.warning("matplotlib is not installed: no figures (pip install 'seap[plots]')")
        self.files[f"{self.name}.json"] = str(out / f"{self.name}.json")
        self.files[f"{self.name}.md"] = str(out / f"{self.name}.md")
        self.data["files"] = sorted(self.files)
        write_json(out / f"{self.name}.json", self.data)
        pictures = "".join(f"![{f}]({f})\n\n" for f in self.files if f.endswith(".png"))
        write_text(out / f"{self.name}.md", f"# seap analyze {self.name}\n\n{self.markdown}\n{pictures}")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"

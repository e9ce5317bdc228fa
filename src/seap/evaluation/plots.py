"""Plots a person would rather look at than read (needs the `plots` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_path

if TYPE_CHECKING:
    from ..inference.router import RouterEval


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_plot(res: RouterEval, path: str | Path) -> Path:
    """Row-normalised confusion matrix of a router evaluation (rows: true task, columns: expert)."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(res.confusion, dtype=float)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(res.predicted) + 2.5, 0.8 * len(res.classes) + 2))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(res.predicted)), res.predicted, rotation=35, ha="right")
    ax.set_yticks(range(len(res.classes)), res.classes)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("expert the prompt was routed to")
    ax.set_ylabel("true task")
    ax.set_title(f"router on held-out prompts: accuracy {res.accuracy:.3f} (n={sum(map(sum, res.confusion))})")
    fig.colorbar(im, ax=ax, label="share of the task's prompts")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path

"""The pictures of `seap analyze` (matplotlib, Agg). Each function draws numbers it is given and
saves one PNG atomically; none touches a model."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .._io import atomic_path
from ..evaluation.plots import _pyplot

DPI = 100


def _save(fig, path: str | Path, layout: bool = True) -> Path:
    plt = _pyplot()
    path = Path(path)
    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    with atomic_path(path) as tmp:
        write_palette_png(buf.getvalue(), tmp)
    return path


def write_palette_png(png: bytes, path: str | Path) -> None:
    """A 256-colour palette PNG: a third of the size of matplotlib's RGBA, the same picture to the eye."""
    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, format="PNG", optimize=True)


def _short(name: str) -> str:
    return name.removeprefix("default:")  # the embedded families read better without the prefix


def _colours(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# -- clusters ---------------------------------------------------------------------------------------
def cluster_maps(coords: dict[int, np.ndarray], labels: np.ndarray, tasks: Sequence[str], scores: Sequence[float],
                 map_scores: dict[int, float], method: str, model: str, path: str | Path) -> Path:
    """One panel per layer: the prompts in 2-D, one colour per task."""
    plt = _pyplot()
    layers = sorted(coords)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers) + 1.8, 3.6), squeeze=False)
    colours = _colours(len(tasks))
    for ax, layer in zip(axes[0], layers):
        pts = coords[layer]
        for task, c in zip(tasks, colours):
            sel = labels == task
            ax.scatter(pts[sel, 0], pts[sel, 1], s=9, color=c, alpha=0.75, label=_short(task), linewidths=0)
        ax.set_title(f"layer {layer}: silhouette {scores[layer]:.2f} (full), {map_scores[layer]:.2f} (map)", fontsize=9)
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, markerscale=1.8, frameon=False)
    fig.suptitle(f"{model}: task prompts' hidden states ({method} of standardised mean-pooled states)", fontsize=11)
    return _save(fig, path)


def silhouette_curve(scores: Sequence[float], shown: Sequence[int], model: str, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(range(len(scores)), scores, marker="o", ms=3, label="all layers")
    ax.plot(list(shown), [scores[l] for l in shown], "s", color="C3", label="layers drawn in the 2-D maps")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("silhouette by task (full space)")
    ax.set_ylim(min(0.0, min(scores) - 0.02), max(scores) + 0.02)
    ax.set_title(f"{model}: how well task prompts separate, per layer", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# -- heatmap ----------------------------------------------------------------------------------------
def activation_heatmaps(profiles: dict[str, np.ndarray], tasks: Sequence[str], model: str, path: str | Path) -> Path:
    """Rows: tasks; columns: the two random halves; each image layers x channels of log2(RMS / layer mean)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(8.4, 1.55 * len(tasks) + 1.0), squeeze=False, sharex=True)
    im = None
    for row, task in zip(axes, tasks):
        for ax, half in zip(row, ("A", "B")):
            img = profiles[f"{task}/{half}"]
            im = ax.imshow(img, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
            ax.set_title(f"{_short(task)}, half {half}", fontsize=9)
            ax.set_ylabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(f"FFN channel (first {img.shape[1]})", fontsize=8)
    fig.suptitle(f"{model}: RMS activation per FFN channel, two random halves of each task", fontsize=11)
    fig.tight_layout()
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="log2(RMS / layer mean)")
    # tight_layout after a colorbar spanning several axes would squeeze it: laid out above, before it.
    return _save(fig, path, layout=False)


def _annotated(ax, m: np.ndarray, labels: list[str], cmap: str, vmin: float, rotation: int, cell_font: int):
    """A square matrix (values up to 1) with its labels, and each cell's value written in it while they fit."""
    n = len(labels)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=1)
    ax.set_xticks(range(n), labels, rotation=rotation, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=cell_font,
                        color="black" if m[i, j] > 0.6 else "white")
    return im


def similarity_matrix(sim: np.ndarray, names: Sequence[str], within: float, between: float, model: str,
                      path: str | Path) -> Path:
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(0.55 * n + 3.2, 0.5 * n + 2.4))
    im = _annotated(ax, sim, [_short(x) for x in names], "viridis", min(0.0, float(sim.min())), 60, 6)
    ax.set_title(f"{model}: profile correlation\nwithin-task {within:.3f}, between tasks {between:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean over layers of Pearson r")
    return _save(fig, path)


def within_between(within: Sequence[float], between: Sequence[float], model: str, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(within, marker="o", ms=3, label="within a task (half A vs half B)")
    ax.plot(between, marker="s", ms=3, label="between tasks")
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson r of log RMS profiles")
    ax.set_title(f"{model}: are a task's active channels its own?", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# -- sensitivity ------------------------------------------------------------------------------------
def _shade_protected(ax, n_layers: int, first: int, last: int) -> None:
    for lo, hi in ((-0.5, first - 0.5), (n_layers - last - 0.5, n_layers - 0.5)):
        if hi > lo:
            ax.axvspan(lo, hi, color="grey", alpha=0.15, lw=0)


def sensitivity_curves(data: dict, path: str | Path) -> Path:
    """Damage of pruning each layer alone, per ratio: cosine of the final hidden states and NLL."""
    plt = _pyplot()
    cfg = data["config"]
    ratios = cfg["ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    titles = {"cosine": "1 - cos(final hidden, dense)", "ppl": "Δ NLL = log(ppl / dense ppl)"}
    for ax, metric in zip(axes, ("cosine", "ppl")):
        d = np.asarray(data["damage"][metric])
        n = len(d)
        for j, r in enumerate(ratios):
            ax.plot(range(n), d[:, j], marker="o", ms=3, label=f"{100 * r:g}% of the layer's channels")
        _shade_protected(ax, n, cfg["protect_first"], cfg["protect_last"])
        if metric == "cosine" and (d > 0).all():
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("pruned layer (grey: kept dense by the schedule)")
        ax.set_ylabel(titles[metric])
        ax.grid(alpha=0.3)
    axes[0].set_title("damage to the final hidden states", fontsize=10)
    axes[1].set_title(f"damage to perplexity (dense {data['dense']['perplexity']:.1f})", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: pruning one layer at a time ({data['sample']['tokens']} tokens of "
                 f"{data['sample']['corpus']})", fontsize=11)
    return _save(fig, path)


def _logistic(x: np.ndarray, k: float, x0: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(-k * (x - x0), -500, 500)))


def schedule_fit(data: dict, path: str | Path) -> Path:
    """Left: measured tolerance per pruned layer with the fitted and the default logistic; right: the
    pruned fraction of every layer at 50% under uniform, default logistic and fitted logistic."""
    from .schedule import DEFAULT_K, DEFAULT_X0

    plt = _pyplot()
    sched = data["schedule"]
    fit = data["fits"][sched["metric"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    x = np.asarray(fit["x"])
    grid = np.linspace(0, 1, 200)
    ax.plot(x, fit["tolerance"], "o", color="C0", label=f"measured tolerance ({sched['metric']})")
    ax.plot(grid, fit["amplitude"] * _logistic(grid, fit["k"], fit["x0"]), color="C3",
            label=f"fit: k={fit['k']:.2f}, x0={fit['x0']:.2f} (R² {fit['r2']:.2f})")
    ref = _logistic(grid, DEFAULT_K, DEFAULT_X0)
    ax.plot(grid, ref / ref.max(), "--", color="grey", label=f"SEAP default k={DEFAULT_K}, x0={DEFAULT_X0} (scaled)")
    ax.set_xlabel("relative depth x of the pruned layers")
    ax.set_ylabel("tolerance (c_l^-1/2, max 1)")
    ax.set_title("less damage -> prune more: the fitted logistic", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for (name, rates), style in zip(data["rates_at_0.5"].items(), ("-", "--", "-")):
        if rates is not None:
            ax.plot(range(len(rates)), [100 * r for r in rates], style, marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN channels pruned (%)")
    ax.set_title("per-layer pruning at 50% of all FFN parameters", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{data['model']}: the logistic layer schedule fitted to measured sensitivity", fontsize=11)
    return _save(fig, path)


# -- plans ------------------------------------------------------------------------------------------
def plan_widths(kept: dict[str, Sequence[float]], model: str, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    styles = ["-", "--", ":", "-."]
    groups: dict[tuple, list[str]] = {}  # experts of one schedule share their widths: one line each
    for name, fr in kept.items():
        groups.setdefault(tuple(round(f, 6) for f in fr), []).append(name)
    for i, (fr, names) in enumerate(groups.items()):
        label = names[0] if len(names) == 1 else f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)})"
        ax.plot(range(len(fr)), [100 * f for f in fr], styles[(i // 10) % 4], marker="o", ms=2.5, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN channels kept (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{model}: kept share of each layer's FFN, per expert", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def jaccard_matrix(mean: Sequence[Sequence[float]], names: Sequence[str], model: str, path: str | Path) -> Path:
    plt = _pyplot()
    m = np.asarray(mean)
    n = len(names)
    fig, ax = plt.subplots(figsize=(0.6 * n + 3.4, 0.55 * n + 2.4))
    im = _annotated(ax, m, list(names), "magma", 0.0, 50, 7)
    ax.set_title(f"{model}: overlap of kept channels\n(Jaccard, mean over the pruned layers)", fontsize=10)
    fig.colorbar(im, ax=ax, label="Jaccard index")
    return _save(fig, path)


def jaccard_layers(per_layer: dict[str, Sequence[float]], model: str, path: str | Path) -> Path:
    plt = _pyplot()
    pairs = list(per_layer)
    m = np.asarray([per_layer[p] for p in pairs])
    fig, ax = plt.subplots(figsize=(min(12.0, 0.22 * m.shape[1] + 5.5), 0.28 * len(pairs) + 1.8))
    im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
    step = max(1, math.ceil(m.shape[1] / 15))
    ax.set_xticks(range(0, m.shape[1], step))
    ax.set_xlabel("layer")
    ax.set_title(f"{model}: Jaccard overlap per layer for each pair of experts", fontsize=10)
    fig.colorbar(im, ax=ax, label="Jaccard index")
    return _save(fig, path)

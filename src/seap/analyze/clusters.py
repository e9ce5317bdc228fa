"""Do tasks cluster in hidden-state space? (SEAP Figure 1)

Each prompt becomes one vector per layer: the layer's output hidden states pooled over the
prompt's real tokens (mean, or the last token). Per layer the vectors are standardised per
dimension (a few "massive activation" dimensions would otherwise decide every distance), then
scored with the silhouette coefficient over task labels (in the full space: 1 = tight, separate
task clusters, 0 = overlapping, < 0 = mixed up) and reduced to 2-D for the pictures (PCA; t-SNE;
UMAP when the package is installed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calibration.engine import Outcome, run_pass
from ..calibration.observers import PooledOutputs
from ..calibration.layerwise import engine_for
from ..calibration.stats import indexed_batches, position_limit
from ..errors import ConfigError
from ..model.loading import LoadedModel, use_or_open
from .common import Analysis, check_layers, check_positive, default_tasks, markdown_table, spread_layers, task_texts

POOLS = ("mean", "last")
METHODS = ("pca", "tsne", "umap")
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


@dataclass(frozen=True)
class ClusterConfig:
    layers: tuple[int, ...] | None = None  # None: four layers spread over the depth, the last included
    pool: str = "mean"
    limit: int = 60  # prompts per task
    max_length: int = 256
    batch_size: int = 16
    methods: tuple[str, ...] = ("pca", "tsne")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"unknown pooling {self.pool!r}: choose one of {', '.join(POOLS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown reduction {bad[0] if bad else '(none)'}: choose from {', '.join(METHODS)}")
        check_positive(limit=self.limit, max_length=self.max_length, batch_size=self.batch_size)


@torch.no_grad()
def pooled_hidden_states(lm: LoadedModel, texts: Sequence[str], *, pool: str = "mean", max_length: int = 256,
                         batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Every layer's output pooled per text over its real tokens: [n_layers, n_texts, hidden] (float32).
    A pass of the calibration engine (the model in memory, or streamed layer by layer from its checkpoint)."""
    indexed = indexed_batches(lm.tokenizer, texts, batch_size, position_limit(lm.model.config, max_length))
    if sum(len(r) for r, _ in indexed) != len(texts):
        raise ConfigError("a prompt is empty: every text needs at least one non-blank character")
    rows, enc = [r for r, _ in indexed], [e for _, e in indexed]
    engine, _ = engine_for(lm, {"t": texts}, batch_size=batch_size, max_length=max_length,
                           encoded=(enc, ["t"] * len(enc), {"t": len(texts)}))
    probe = PooledOutputs(engine.n_layers, rows, lm.adapter.hidden_size(lm.model), pool)
    run_pass(engine, [probe], lambda i, layer, seen: Outcome(), desc="hidden states", progress=progress)
    return probe.result()


def standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per dimension (constant dimensions stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def silhouette(x: np.ndarray, labels: Sequence) -> float:
    """Mean silhouette coefficient of the labelled points (Euclidean), in [-1, 1]."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    n_labels = len(set(labels.tolist()))
    if n_labels < 2 or n_labels >= len(labels):
        raise ConfigError(f"a silhouette needs at least 2 tasks and more prompts than tasks (got {n_labels} tasks, "
                          f"{len(labels)} prompts): add a task or raise --limit")
    return float(silhouette_score(x, labels, metric="euclidean"))


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def reduce_2d(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """[n, dims] -> [n, 2] by PCA, t-SNE or UMAP."""
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # t-SNE's perplexity must stay below the number of points; 30 is the usual choice.
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        # One thread: on a busy machine its OpenMP threads spin-wait, 0.1 s becomes 30 s for a few hundred points.
        with threadpool_limits(1):
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ConfigError(f"unknown reduction {method!r}: choose from {', '.join(METHODS)}")


def analyze_clusters(model: str | LoadedModel | None = None, tasks: Sequence[str] | None = None, *,
                     config: ClusterConfig | None = None, data_dir: str | Path | None = None,
                     out: str | Path | None = None, progress: bool = True, runtime=None) -> Analysis:
    """`seap analyze clusters`: silhouette per layer and 2-D maps of the task prompts' hidden states."""
    t0 = time.time()
    cfg = config or ClusterConfig()
    tasks = list(tasks or default_tasks(data_dir))
    texts = task_texts(tasks, data_dir=data_dir, limit=cfg.limit, seed=cfg.seed, prompts=True)
    lm = use_or_open(model, runtime)
    n_layers = len(lm.adapter.layers(lm.model))
    shown = check_layers(cfg.layers, n_layers) if cfg.layers else spread_layers(n_layers)
    methods = [m for m in cfg.methods if m != "umap" or umap_available()]
    flat = [t for task in tasks for t in texts[task]]
    labels = np.array([task for task in tasks for _ in texts[task]])
    feats = pooled_hidden_states(lm, flat, pool=cfg.pool, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                 progress=progress)
    scores, coords, map_scores = [], {m: {} for m in methods}, {m: {} for m in methods}
    for layer in tqdm(range(n_layers), desc="silhouette and 2-D maps", unit="layer", disable=not progress):
        x = standardize(feats[layer].numpy())
        scores.append(silhouette(x, labels))
        if layer in shown:
            for m in methods:
                coords[m][layer] = reduce_2d(x, m, cfg.seed)
                # The same score on the 2-D map: it describes the picture, the full-space one the model.
                map_scores[m][layer] = silhouette(coords[m][layer], labels)
    best = int(np.argmax(scores))
    data = {
        "model": lm.source.model_id, "tasks": {t: len(texts[t]) for t in tasks}, "config": asdict(cfg),
        "layers_shown": list(shown), "methods": methods, "silhouette": scores,
        "best_layer": best, "best_silhouette": scores[best],
        "silhouette_2d": {m: {str(l): v for l, v in per.items()} for m, per in map_scores.items()},
        "seconds": round(time.time() - t0, 1),
        # The 2-D points behind the pictures, so they can be redrawn without the model.
        "points": {m: {str(l): np.round(c, 4).tolist() for l, c in per.items()} for m, per in coords.items()},
        "labels": labels.tolist(),
    }
    rows = [(l, f"{scores[l]:.3f}", *(f"{map_scores[m][l]:.3f}" for m in methods)) for l in shown]
    md = (f"Model `{lm.source.model_id}`; {len(flat)} prompts of {len(tasks)} tasks "
          f"({', '.join(f'{t} {len(texts[t])}' for t in tasks)}); hidden states pooled by {cfg.pool} over the "
          f"prompt's tokens and standardised per dimension. Silhouette (Euclidean, full space; 1 = separate task "
          f"clusters, 0 = overlap): best at layer {best} ({scores[best]:.3f}). The same score on each 2-D map "
          f"describes the picture (a map can separate what the full space barely does).\n\n"
          + markdown_table(("layer", "silhouette (full space)", *(f"on the {METHOD_NAMES[m]} map" for m in methods)),
                           rows))
    res = Analysis("clusters", data, md)
    if out is not None:
        from . import plots

        name = lm.source.model_id
        figures = {f"clusters_{m}.png": (lambda p, m=m: plots.cluster_maps(coords[m], labels, tasks, scores,
                                                                           map_scores[m], METHOD_NAMES[m], name, p))
                   for m in methods}
        figures["clusters_silhouette.png"] = lambda p: plots.silhouette_curve(scores, shown, name, p)
        res.save(out, figures)
    return res

"""Do tasks activate distinct FFN channels, consistently? (SEAP Figure 3 and its split-half check)

For each task the corpus (prompt + gold answer) is split into two random halves; each half's
activation statistics (seap.calibration.stats, the input of every layer's FFN output linear) give a profile:
per layer, the root-mean-square magnitude of every channel. Profiles are compared per layer by
the Pearson correlation of the log magnitudes (magnitudes span orders of size; the log makes the
comparison scale-free and lets every channel count), averaged over layers. Two halves of one task
should agree more ("within-task") than two different tasks ("between-task"); identical halves
give 1. The pictures show log2(magnitude / the layer's mean) for the first channels.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch

from ..calibration.layerwise import collect_stats
from ..calibration.stats import ActivationStats
from ..errors import ConfigError
from ..model.loading import LoadedModel, use_or_open
from .common import Analysis, check_positive, default_tasks, markdown_table, task_texts

HALVES = ("A", "B")
_EPS = 1e-12  # dead channels (magnitude 0) stay finite under the log


@dataclass(frozen=True)
class HeatmapConfig:
    limit: int = 60  # texts per task, split into two halves
    dims: int = 128  # channels drawn per layer (all are compared)
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(dims=self.dims, max_length=self.max_length, batch_size=self.batch_size)
        if self.limit < 2:
            raise ConfigError(f"limit must be at least 2 (two halves of each task), got {self.limit}")


def split_halves(texts: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Two disjoint random halves (seeded), each in the original order."""
    if len(texts) < 2:
        raise ConfigError(f"a task needs at least 2 texts to split into halves, got {len(texts)}: raise --limit")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return [texts[i] for i in sorted(order[:half])], [texts[i] for i in sorted(order[half:])]


def magnitude_profile(stats: ActivationStats) -> list[torch.Tensor]:
    """Per layer, the RMS magnitude of each FFN channel: sqrt(mean z_j^2), [d_ff] (float64)."""
    return [s.mean_sq.sqrt() for s in stats.ffn]


def log_profile(profile: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """log2(magnitude / the layer's mean magnitude): 0 = an average channel of that layer."""
    return [torch.log2((p + _EPS) / (p.mean() + _EPS)) for p in profile]


def layer_correlations(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    """Pearson correlation per layer of two log profiles (1 where both are constant and equal)."""
    out = []
    for x, y in zip(a, b, strict=True):
        x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
        den = float(x.norm() * y.norm())
        out.append(float(x @ y) / den if den > 0 else float(torch.equal(x, y)))
    return out


def similarity_matrix(profiles: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """[n, n] mean-over-layers correlation between every pair of log profiles."""
    n = len(profiles)
    sim = torch.eye(n, dtype=torch.float64)
    for i, j in combinations(range(n), 2):
        sim[i, j] = sim[j, i] = sum(layer_correlations(profiles[i], profiles[j])) / len(profiles[i])
    return sim


def within_between(per_layer: dict[tuple[str, str], list[float]], tasks: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per layer: mean correlation of the two halves of a task, and of halves of different tasks.

    `per_layer[(a, b)]` holds the correlations of profiles a and b (names "task/A", "task/B")."""
    n_layers = len(next(iter(per_layer.values())))

    def corr(a: str, b: str) -> list[float]:
        return per_layer[(a, b)] if (a, b) in per_layer else per_layer[(b, a)]

    within = [sum(corr(f"{t}/A", f"{t}/B")[l] for t in tasks) / len(tasks) for l in range(n_layers)]
    pairs = [(f"{t}/{h}", f"{u}/{g}") for t, u in combinations(tasks, 2) for h in HALVES for g in HALVES]
    between = [sum(corr(a, b)[l] for a, b in pairs) / len(pairs) if pairs else float("nan") for l in range(n_layers)]
    return within, between


def analyze_heatmap(model: str | LoadedModel | None = None, tasks: Sequence[str] | None = None, *,
                    config: HeatmapConfig | None = None, data_dir: str | Path | None = None,
                    out: str | Path | None = None, progress: bool = True, runtime=None) -> Analysis:
    """`seap analyze heatmap`: split-half activation profiles per task, and within- vs between-task similarity."""
    t0 = time.time()
    cfg = config or HeatmapConfig()
    tasks = list(tasks or default_tasks(data_dir))
    texts = task_texts(tasks, data_dir=data_dir, limit=cfg.limit, seed=cfg.seed, prompts=False)
    lm = use_or_open(model, runtime)
    logs: dict[str, list[torch.Tensor]] = {}
    for task in tasks:
        for half, part in zip(HALVES, split_halves(texts[task], cfg.seed)):
            stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, part, batch_size=cfg.batch_size,
                                  max_length=cfg.max_length, progress=progress)
            logs[f"{task}/{half}"] = log_profile(magnitude_profile(stats))
    names = list(logs)
    per_layer = {(a, b): layer_correlations(logs[a], logs[b]) for a, b in combinations(names, 2)}
    sim = similarity_matrix([logs[n] for n in names])
    within, between = within_between(per_layer, tasks)
    n_layers = len(within)
    w_mean, b_mean = sum(within) / n_layers, sum(between) / n_layers
    per_task = {t: sum(per_layer[(f"{t}/A", f"{t}/B")]) / n_layers for t in tasks}
    dims = min(cfg.dims, min(len(p) for p in next(iter(logs.values()))))
    data = {
        "model": lm.source.model_id, "tasks": {t: len(texts[t]) for t in tasks}, "config": asdict(cfg),
        "within_task": w_mean, "between_task": b_mean, "within_by_task": per_task,
        "within_by_layer": within, "between_by_layer": between,
        "similarity": {"names": names, "matrix": sim.tolist()}, "seconds": round(time.time() - t0, 1),
    }
    md = (f"Model `{lm.source.model_id}`; each task's texts (prompt + answer) split into two random halves "
          f"({', '.join(f'{t} {len(texts[t])}' for t in tasks)}). Similarity = Pearson correlation of log RMS "
          f"channel magnitudes, averaged over the {n_layers} layers.\n\n"
          f"**Within-task (half A vs half B): {w_mean:.3f}; between tasks: {b_mean:.3f}.**\n\n"
          + markdown_table(("task", "half A vs half B"), [(t, f"{v:.3f}") for t, v in per_task.items()]))
    res = Analysis("heatmap", data, md)
    if out is not None:
        from . import plots

        name = lm.source.model_id
        shown = {n: torch.stack([p[:dims] for p in logs[n]]).numpy() for n in names}
        res.save(out, {
            "heatmap.png": lambda p: plots.activation_heatmaps(shown, tasks, name, p),
            "heatmap_similarity.png": lambda p: plots.similarity_matrix(sim.numpy(), names, w_mean, b_mean, name, p),
            "heatmap_layers.png": lambda p: plots.within_between(within, between, name, p),
        })
    return res

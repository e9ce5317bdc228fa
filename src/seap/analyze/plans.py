"""What do plans keep? Per-layer widths and kept fractions, and how much task experts overlap.

Overlap of two experts in a layer is the Jaccard index of their kept FFN channels,
|A n B| / |A u B|. For scale, two random sets of the same sizes a and b out of n channels overlap
by E|A n B| = a b / n, a Jaccard of about (ab/n) / (a + b - ab/n) (1/3 for two halves): task
experts above that share channels for a reason; near it they are as different as chance.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError
from ..pruning.plan import Plan
from .common import Analysis, markdown_table


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A n B| / |A u B| of two index sets (1 for two empty sets)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def chance_jaccard(n: int, a: int, b: int) -> float:
    """Jaccard expected of random sets of sizes a and b out of n (ratio of expectations)."""
    inter = a * b / n
    union = a + b - inter
    return inter / union if union else 1.0


def layer_jaccard(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    if len(a) != len(b):
        raise ConfigError(f"experts with {len(a)} and {len(b)} layers cannot be compared: use plans of one model")
    return [jaccard(x, y) for x, y in zip(a, b)]


def _load(plans: Sequence[str | Path | Plan]) -> list[tuple[str, Plan]]:
    if not plans:
        raise ConfigError("give at least one plan (--plan DIR)")
    loaded = [(str(p), p if isinstance(p, Plan) else Plan.load(p)) for p in plans]
    hashes = {p.meta.fingerprint["arch_hash"] for _, p in loaded}
    if len(hashes) > 1:
        raise ConfigError("these plans were made for different models: compare plans of one base model")
    return loaded


def _label(plan: Plan) -> str:
    """A short plan name: its allocation and ratio."""
    return f"{plan.meta.prune_config.allocation.name}@{plan.meta.target_ratio:g}"


def _plan_info(path: str, label: str, plan: Plan) -> dict:
    alloc = plan.meta.prune_config.allocation
    return {"folder": path, "label": label, "method": plan.meta.method, "target_ratio": plan.meta.target_ratio,
            "allocation": alloc.name, "k": alloc.k, "x0": alloc.x0,
            # plans made before the schedule was a value recorded it as "fitted"
            "schedule": alloc.schedule.to_dict() if alloc.schedule is not None else plan.meta.config.get("fitted")}


def analyze_plans(plans: Sequence[str | Path | Plan], *, experts: Sequence[str] | None = None,
                  out: str | Path | None = None) -> Analysis:
    """`seap analyze plan`: widths, kept fractions and the Jaccard overlap of the experts of one or more
    plans (only the experts named in `experts`, when given)."""
    loaded = _load(plans)
    for want in experts or ():
        if not any(want in p.experts for _, p in loaded):
            raise ConfigError(f"no plan has an expert {want!r}: choose from "
                              f"{', '.join(sorted({e for _, p in loaded for e in p.experts}))}")
    many = len(loaded) > 1
    labels = [_label(p) for _, p in loaded]
    if len(set(labels)) < len(labels):  # two plans that read alike: number them
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    dense = loaded[0][1].meta.fingerprint["arch"]["d_ff"]
    chosen, kept, widths = {}, {}, {}
    for label, (_, plan) in zip(labels, loaded):
        for name, ex in plan.experts.items():
            if experts and name not in experts:
                continue
            key = f"{label}:{name}" if many else name
            chosen[key] = ex.ffn
            widths[key] = ex.widths()
            kept[key] = [w / n for w, n in zip(ex.widths(), dense)]
    names = list(chosen)
    per_layer = {f"{a} vs {b}": layer_jaccard(chosen[a], chosen[b]) for a, b in combinations(names, 2)}

    def pruned(a: str, b: str) -> list[int]:
        """Layers where a or b removes something: dense layers overlap fully and would only dilute the mean."""
        return [l for l, d in enumerate(dense) if min(len(chosen[a][l]), len(chosen[b][l])) < d] or list(range(len(dense)))

    def mean_of(a: str, b: str) -> float:
        v = per_layer[f"{a} vs {b}"] if f"{a} vs {b}" in per_layer else per_layer[f"{b} vs {a}"]
        return sum(v[l] for l in pruned(a, b)) / len(pruned(a, b))

    mean = [[1.0 if a == b else mean_of(a, b) for b in names] for a in names]
    chance = {f"{a} vs {b}": sum(chance_jaccard(dense[l], len(chosen[a][l]), len(chosen[b][l])) for l in pruned(a, b))
              / len(pruned(a, b)) for a, b in combinations(names, 2)}
    plan_info = [_plan_info(path, label, p) for label, (path, p) in zip(labels, loaded)]
    data = {"base_model": loaded[0][1].meta.base_model, "plans": plan_info, "dense_widths": dense,
            "widths": widths, "kept_fraction": kept, "jaccard": {"names": names, "mean": mean, "by_layer": per_layer,
                                                                   "chance": chance}}
    rows = [(k, f"{sum(w) / sum(dense):.3f}", f"{min(kept[k]):.2f}..{max(kept[k]):.2f}") for k, w in widths.items()]
    md = (f"Base model `{data['base_model']}`; {len(loaded)} plan(s), {len(names)} experts.\n\n"
          + markdown_table(("expert", "FFN kept", "kept per layer"), rows))
    if per_layer:
        means = {f"{a} vs {b}": mean_of(a, b) for a, b in combinations(names, 2)}
        md += ("\nJaccard overlap of kept channels, mean over the pruned layers (chance: random sets of the same "
               "sizes):\n\n" + markdown_table(("pair", "Jaccard", "chance"),
                                               [(k, f"{v:.3f}", f"{chance[k]:.3f}") for k, v in means.items()]))
    res = Analysis("plan", data, md)
    if out is not None:
        from . import plots

        figures = {"plan_widths.png": lambda p: plots.plan_widths(kept, data["base_model"], p)}
        if per_layer:
            figures["plan_jaccard.png"] = lambda p: plots.jaccard_matrix(mean, names, data["base_model"], p)
            figures["plan_jaccard_layers.png"] = lambda p: plots.jaccard_layers(per_layer, data["base_model"], p)
        res.save(out, figures)
    return res

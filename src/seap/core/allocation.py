"""Layer allocation (docs/design.md §2.3): how many units each layer keeps so that the model-wide
fraction of prunable parameters removed is exactly the target ratio G.

All functions are pure. A layer pool is described by unit counts n_l and per-unit parameter
costs c_l; the result is the number of units kept per layer. Every schedule first produces
real-valued removal targets, then `integerize` turns them into whole units (multiples of
`multiple`) whose total removed parameters is within half a step of G * P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import ConfigError

DEFAULT_K, DEFAULT_X0 = 1.2, 0.3  # SEAP's logistic: steepness and midpoint over the relative depth



@dataclass(frozen=True)
class Pool:
    """Units of one kind (FFN channels or heads) across layers."""

    counts: tuple[int, ...]  # n_l units per layer
    costs: tuple[int, ...]  # parameters per unit in layer l

    @property
    def params(self) -> tuple[int, ...]:
        return tuple(n * c for n, c in zip(self.counts, self.costs))

    @property
    def total(self) -> int:
        return sum(self.params)


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise ConfigError(f"ratio must be a fraction strictly between 0 and 1 (e.g. 0.5 for half), got {ratio}")


def active_layers(n_layers: int, protect_first: int, protect_last: int) -> list[int]:
    if protect_first < 0 or protect_last < 0:
        raise ConfigError("protected layer counts must be >= 0")
    active = list(range(protect_first, n_layers - protect_last))
    if not active:
        raise ConfigError(f"protecting {protect_first} first and {protect_last} last layers leaves none of the "
                          f"{n_layers} layers to prune: lower --protect-first/--protect-last")
    return active


def integerize(pool: Pool, remove_target: Sequence[float], budget: float, *, multiple: int = 1,
               min_keep: int = 1, frozen: Sequence[int] = ()) -> list[int]:
    """Units kept per layer: near `remove_target` (units per layer), total removed params ~ budget.

    Kept widths are multiples of `multiple` (or the full width), at least `min_keep`; `frozen`
    layers stay whole. The total removed parameters end within half of one step's cost of the
    budget whenever the budget is reachable.
    """
    if multiple < 1:
        raise ConfigError("multiple must be >= 1")
    frozen = set(frozen)
    floor_keep = [max(min_keep, multiple) if min_keep > 0 else 0 for _ in pool.counts]

    def allowed(n: int, fl: int) -> list[int]:
        vals = list(range(math.ceil(fl / multiple) * multiple, n, multiple)) if multiple > 0 else []
        return [v for v in vals if v >= fl and v < n] + [n]

    choices = [([n] if i in frozen else allowed(n, floor_keep[i])) for i, n in enumerate(pool.counts)]
    # Start from the smallest allowed keep >= desired keep (remove no more than asked), then
    # walk layers down one step at a time, furthest-above-target first, while that helps.
    pos = []
    for i, n in enumerate(pool.counts):
        desired = n - remove_target[i]
        opts = choices[i]
        j = next((k for k, v in enumerate(opts) if v >= desired - 1e-9), len(opts) - 1)
        pos.append(j)

    def removed() -> float:
        return sum((pool.counts[i] - choices[i][pos[i]]) * pool.costs[i] for i in range(len(pos)))

    deficit = budget - removed()
    while deficit > 0:
        best, best_key = None, None
        for i in range(len(pos)):
            if pos[i] == 0:
                continue
            step_cost = (choices[i][pos[i]] - choices[i][pos[i] - 1]) * pool.costs[i]
            if step_cost > 2 * deficit:  # the step would overshoot by more than it fixes
                continue
            excess = choices[i][pos[i]] - (pool.counts[i] - remove_target[i])
            key = (excess / max(1, choices[i][pos[i]] - choices[i][pos[i] - 1]), -i)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            break
        deficit -= (choices[best][pos[best]] - choices[best][pos[best] - 1]) * pool.costs[best]
        pos[best] -= 1
    largest_step = max(multiple * c for c in pool.costs)
    if deficit > largest_step / 2 + 1e-6:
        raise ConfigError(f"the ratio cannot be met: layers must keep at least {max(min_keep, multiple)} units "
                          f"(multiples of {multiple}); lower the ratio or --multiple")
    return [choices[i][pos[i]] for i in range(len(pos))]


def uniform(pool: Pool, ratio: float, *, protect_first: int = 0, protect_last: int = 0,
            multiple: int = 1, budget: float | None = None, equal_widths: bool = True) -> list[int]:
    """Every active layer removes the same fraction; protected layers stay dense.

    With `equal_widths` (and identical layers) every active layer gets the same width, so the
    result reloads as a plain model; the ratio is then met to within half a width step per
    layer. Without it, widths may differ by one step and the ratio is met within half a step.
    """
    check_ratio(ratio)
    budget = ratio * pool.total if budget is None else budget
    active = active_layers(len(pool.counts), protect_first, protect_last)
    active_params = sum(pool.params[i] for i in active)
    frac = budget / active_params
    if frac >= 1:
        raise ConfigError(f"ratio {ratio} cannot be met with layers {protect_first} first/{protect_last} last "
                          "kept dense: lower the ratio or protect fewer layers")
    target = [pool.counts[i] * frac if i in active else 0.0 for i in range(len(pool.counts))]
    frozen = [i for i in range(len(pool.counts)) if i not in active]
    same = len({(pool.counts[i], pool.costs[i]) for i in active}) == 1
    if equal_widths and same:
        n = pool.counts[active[0]]
        options = [v for v in range(multiple, n, multiple)] + [n]
        width = min(options, key=lambda v: (abs(v - (n - target[active[0]])), v))
        return [width if i in active else pool.counts[i] for i in range(len(pool.counts))]
    return integerize(pool, target, budget, multiple=multiple, frozen=frozen)


def relative_depths(n_layers: int, protect_first: int, protect_last: int) -> dict[int, float]:
    """Relative depth x in [0, 1] of every pruned layer, the coordinate of the logistic schedule."""
    active = active_layers(n_layers, protect_first, protect_last)
    span = max(1, len(active) - 1)
    return {i: pos / span for pos, i in enumerate(active)}


def logistic_rho(n_layers: int, lam: float, *, protect_first: int, protect_last: int, k: float, x0: float,
                 rho_max: float) -> list[float]:
    """SEAP's layer-wise sparsity: rho_l = Lambda / (1 + exp(-k (x - x0))), deeper layers pruned more."""
    rho = [0.0] * n_layers
    for i, x in relative_depths(n_layers, protect_first, protect_last).items():
        rho[i] = min(rho_max, max(0.0, lam / (1.0 + math.exp(-k * (x - x0)))))
    return rho


def logistic(pool: Pool, ratio: float, *, protect_first: int = 2, protect_last: int = 2, k: float = DEFAULT_K,
             x0: float = DEFAULT_X0, rho_max: float = 0.9, multiple: int = 1, budget: float | None = None) -> list[int]:
    """Logistic schedule whose Lambda is bisected so the parameter-weighted mean over ALL layers is G."""
    check_ratio(ratio)
    if not 0 < rho_max <= 1:
        raise ConfigError("rho_max must be in (0, 1]")
    budget = ratio * pool.total if budget is None else budget
    n = len(pool.counts)

    def removed(lam: float) -> float:
        rho = logistic_rho(n, lam, protect_first=protect_first, protect_last=protect_last, k=k, x0=x0,
                           rho_max=rho_max)
        return sum(r * p for r, p in zip(rho, pool.params))

    active = active_layers(n, protect_first, protect_last)
    # As Lambda grows every active layer reaches rho_max: that is the reach, however steep the curve.
    if sum(rho_max * pool.params[i] for i in active) < budget - 1e-6:
        raise ConfigError(f"ratio {ratio} is out of reach of the logistic schedule (layers capped at rho_max="
                          f"{rho_max}, {protect_first}+{protect_last} layers dense): lower the ratio, raise "
                          "--rho-max or protect fewer layers")
    lo, hi = 0.0, 2.0
    while removed(hi) < budget and hi < 1e300:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < budget else (lo, mid)
    rho = logistic_rho(n, hi, protect_first=protect_first, protect_last=protect_last, k=k, x0=x0, rho_max=rho_max)
    target = [r * c for r, c in zip(rho, pool.counts)]
    frozen = [i for i in range(n) if i not in active]
    return integerize(pool, target, budget, multiple=multiple, frozen=frozen)


def standardize(scores: torch.Tensor, robust: bool = False) -> torch.Tensor:
    s = scores.double()
    if robust:
        q1, med, q3 = torch.quantile(s, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        return (s - med) / max(float(q3 - q1), 1e-12)
    return (s - s.mean()) / max(float(s.std()), 1e-12) if len(s) > 1 else s - s.mean()


def adaptive(pools: Sequence[Pool], scores: Sequence[Sequence[torch.Tensor]], ratio: float, *,
             robust: bool = False, multiple: int = 1, budget: float | None = None) -> list[list[int]]:
    """FLAP's adaptive structure: pool standardised scores of all units, keep the best until the budget.

    `pools[p]` and `scores[p][l]` describe unit kind p (FFN channels, heads). Returns kept counts
    per pool per layer. A layer never loses all its units of a kind.
    """
    check_ratio(ratio)
    total = sum(p.total for p in pools)
    budget = ratio * total if budget is None else budget
    keep_budget = total - budget
    entries = []  # (z-score, cost, pool, layer)
    for p, (pool, per_layer) in enumerate(zip(pools, scores)):
        for layer, s in enumerate(per_layer):
            z = standardize(s, robust)
            entries.extend((float(v), pool.costs[layer], p, layer) for v in z)
    entries.sort(key=lambda e: -e[0])
    kept = [[0] * len(pool.counts) for pool in pools]
    spent = 0.0
    rest = []
    for entry in entries:  # every layer first keeps its best unit of each kind: none is emptied
        _, cost, p, layer = entry
        if kept[p][layer] == 0:
            kept[p][layer] = 1
            spent += cost
        else:
            rest.append(entry)
    finest = min(min(pool.costs) for pool in pools)
    for _, cost, p, layer in rest:  # then the best units model-wide while the budget allows
        if spent + cost <= keep_budget + finest / 2:  # coarse units never overshoot; channels fill in
            kept[p][layer] += 1
            spent += cost
    if multiple == 1:
        return kept
    # Re-round to the width multiple: coarse pools first at their own removal, then the first
    # pool (FFN channels, the finest unit) absorbs the rest so the joint budget still holds.
    out: list[list[int]] = [[] for _ in pools]
    spent_removed = 0.0
    for p in reversed(range(len(pools))):
        pool = pools[p]
        target = [n - k for n, k in zip(pool.counts, kept[p])]
        pool_budget = budget - spent_removed if p == 0 else sum(t * c for t, c in zip(target, pool.costs))
        out[p] = integerize(pool, target, pool_budget, multiple=multiple)
        spent_removed += removed_params(pool, out[p])
    return out


def removed_params(pool: Pool, kept: Sequence[int]) -> int:
    """Parameters removed when layer l keeps kept[l] of its pool.counts[l] units."""
    return sum((n - k) * c for n, k, c in zip(pool.counts, kept, pool.costs))


def achieved_ratio(pool: Pool, kept: Sequence[int]) -> float:
    return removed_params(pool, kept) / pool.total


# -- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """A logistic layer schedule measured on one model by `seap analyze sensitivity`: its (k, x0),
    the layers the fit left out (kept dense), and where it comes from (`source`: metric, ratios,
    model, arch_hash, file). A value of PruneConfig, recorded in every plan built with it."""

    k: float
    x0: float
    protect_first: int
    protect_last: int
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"k": self.k, "x0": self.x0, "protect_first": self.protect_first, "protect_last": self.protect_last,
                "source": dict(self.source)}

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(float(d["k"]), float(d["x0"]), int(d["protect_first"]), int(d["protect_last"]),
                   dict(d.get("source", {})))


@dataclass(frozen=True)
class Settings:
    """What every allocation may read: the model-wide ratio and the schedule's shape."""

    ratio: float
    multiple: int = 1
    protect_first: int = 0
    protect_last: int = 0
    k: float = DEFAULT_K
    x0: float = DEFAULT_X0
    rho_max: float = 0.9
    robust: bool = False


# An allocation: (pools [FFN, heads?], their unit scores, settings, parameter budget) -> kept units per pool
# per layer. Register a new one with @allocation("name"); `seap prune --allocation name` then finds it.
Allocation = Callable[[Sequence[Pool], Sequence[Sequence[torch.Tensor]], Settings, float], list[list[int]]]
ALLOCATORS: dict[str, Allocation] = {}
# Whether an allocation compares unit scores (across layers): one that does not fixes every layer's width
# from the geometry alone, so statistics, choice and refit of a layer can share one pass (docs/design.md §2.10).
ALLOCATION_NEEDS_SCORES: dict[str, bool] = {}


def allocation(name: str, *, needs_scores: bool = False) -> Callable[[Allocation], Allocation]:
    def register(fn: Allocation) -> Allocation:
        ALLOCATORS[name] = fn
        ALLOCATION_NEEDS_SCORES[name] = needs_scores
        return fn
    return register


def _per_layer(schedule: Callable[..., list[int]], pools: Sequence[Pool], s: Settings, budget: float,
               **shape) -> list[list[int]]:
    """A layer schedule on the FFN pool, heads first when there are any: heads are coarse, so they are
    rounded at the same ratio (or the largest share of it, in tenths, that their few units can take) and
    the FFN absorbs the rest of the budget."""
    kept: list[list[int]] = []
    head_removed = 0.0
    if len(pools) > 1:
        heads = pools[1]
        head_kept = list(heads.counts)
        for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
            try:
                head_kept = schedule(heads, s.ratio * f, protect_first=s.protect_first,
                                     protect_last=s.protect_last, multiple=1, **shape)
                break
            except ConfigError:
                continue
        head_removed = removed_params(heads, head_kept)
        kept = [head_kept]
    ffn = schedule(pools[0], s.ratio, protect_first=s.protect_first, protect_last=s.protect_last,
                   multiple=s.multiple, budget=budget - head_removed, **shape)
    return [ffn, *kept]


@allocation("uniform")
def _uniform(pools, scores, s: Settings, budget: float) -> list[list[int]]:
    return _per_layer(uniform, pools, s, budget)


@allocation("logistic")
def _logistic(pools, scores, s: Settings, budget: float) -> list[list[int]]:
    return _per_layer(logistic, pools, s, budget, k=s.k, x0=s.x0, rho_max=s.rho_max)


@allocation("adaptive", needs_scores=True)
def _adaptive(pools, scores, s: Settings, budget: float) -> list[list[int]]:
    return adaptive(pools, scores, s.ratio, robust=s.robust, multiple=s.multiple, budget=budget)


def allocate(name: str, pools: Sequence[Pool], scores: Sequence[Sequence[torch.Tensor]],
             settings: Settings) -> list[list[int]]:
    """Kept units per pool per layer, removing `settings.ratio` of all the pools' parameters together."""
    if name not in ALLOCATORS:
        raise ConfigError(f"unknown allocation {name!r}: choose one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](pools, scores, settings, settings.ratio * sum(p.total for p in pools))

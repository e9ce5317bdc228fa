"""Pruning configuration as validated, frozen data, plus the method presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .allocation import ALLOCATIONS, check_ratio
from .errors import ConfigError
from .scores import SCORES

HEAD_MODES = ("auto", "none", "heads", "kv_groups")

PRESETS: dict[str, dict] = {
    # SEAP: task statistics, s_W score, logistic layer schedule; the plan's task expert is used.
    "seap": dict(score="wifn", allocation="logistic"),
    # SEAP-gen: the generic expert that combines all tasks' scores.
    "seap-gen": dict(score="wifn", allocation="logistic", generic=True),
    "wanda-sp": dict(score="wanda_sp", allocation="uniform"),
    "flap": dict(score="wifv", allocation="adaptive", bias_compensation=True),
    "magnitude": dict(score="magnitude", allocation="uniform"),
    "random": dict(score="random", allocation="uniform"),
}


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.5
    method: str = "seap"
    score: str = "wifn"
    allocation: str = "logistic"
    heads: str = "auto"  # auto: heads for multi-head attention, FFN only for GQA
    bias_compensation: bool = False
    protect_first: int | None = None  # None: the allocation's default (logistic 2, others 0)
    protect_last: int | None = None
    k: float = 1.2
    x0: float = 0.3
    rho_max: float = 0.9
    robust: bool = False
    multiple: int = 1
    seed: int = 0
    generic: bool = False
    lm_weight: float = 3.0  # weight of language-modelling corpora in the generic expert
    task_weight: float = 2.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.method not in PRESETS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(PRESETS)}")
        if self.score not in SCORES:
            raise ConfigError(f"unknown score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.heads not in HEAD_MODES:
            raise ConfigError(f"unknown head mode {self.heads!r}: choose one of {', '.join(HEAD_MODES)}")
        if self.multiple < 1:
            raise ConfigError(f"multiple must be a positive integer, got {self.multiple}")
        if not 0 < self.rho_max <= 1:
            raise ConfigError(f"rho_max must be in (0, 1], got {self.rho_max}")
        for name in ("protect_first", "protect_last"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")

    @classmethod
    def from_method(cls, method: str = "seap", **overrides) -> PruneConfig:
        """A preset with the user's individual choices on top (None means: keep the preset's)."""
        if method not in PRESETS:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[method], method=method)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def first(self) -> int:
        return self.protect_first if self.protect_first is not None else (2 if self.allocation == "logistic" else 0)

    @property
    def last(self) -> int:
        return self.protect_last if self.protect_last is not None else (2 if self.allocation == "logistic" else 0)

    @property
    def needs_stats(self) -> bool:
        return self.score not in ("magnitude", "random") or self.bias_compensation

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> PruneConfig:
        return replace(self, **changes)

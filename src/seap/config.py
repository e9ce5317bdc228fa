"""Pruning configuration as validated, frozen data, plus the method presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .core.allocation import ALLOCATORS, DEFAULT_K, DEFAULT_X0, Schedule, Settings, check_ratio
from .core.scores import SCORES
from .errors import ConfigError

HEAD_MODES = ("auto", "none", "heads", "kv_groups")
DEFAULT_MULTIPLE = 32
MIN_WIDTH_FOR_MULTIPLE = 512
RECONSTRUCT_MODES = ("none", "refit", "sequential")
REFIT_CHOICES = ("score", "obs")

# seap's defaults add training-free reconstruction to the paper's recipe: each layer's FFN channels
# re-chosen for a least-squares refit of its output projection (greedy OBS), measured best on the
# validation splits (benchmarks/RESULTS.md, "Reconstruction").
_RECONSTRUCTION = dict(reconstruct="refit", refit_choice="obs")
PRESETS: dict[str, dict] = {
    # SEAP: task statistics, logistic layer schedule, reconstruction; the plan's task expert is used.
    "seap": dict(score="wifn", allocation="logistic", **_RECONSTRUCTION),
    # SEAP-gen: the generic expert that combines all tasks' statistics.
    "seap-gen": dict(score="wifn", allocation="logistic", generic=True, **_RECONSTRUCTION),
    # The paper's exact recipe (s_W score, logistic schedule, no reconstruction).
    "seap-paper": dict(score="wifn", allocation="logistic"),
    "seap-gen-paper": dict(score="wifn", allocation="logistic", generic=True),
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
    k: float = DEFAULT_K
    x0: float = DEFAULT_X0
    rho_max: float = 0.9
    robust: bool = False
    multiple: int | None = None  # None: 32 for real models (FFNs >= 512 wide), 1 for tiny ones (resolve_multiple)
    seed: int = 0
    generic: bool = False
    lm_weight: float = 3.0  # weight of language-modelling corpora in the generic expert
    task_weight: float = 2.0
    # a logistic schedule measured on this model (seap.analyze.schedule.load_schedule): its k, x0 and
    # dense layers replace the defaults; allocation "logistic" only
    schedule: Schedule | None = None
    # Training-free reconstruction (seap.core.reconstruct): "none", "refit" (least squares on the dense
    # model's activations) or "sequential" (each layer on the outputs of the pruned layers before it)
    reconstruct: str = "none"
    ridge: float = 1e-2  # relative to the mean variance of the kept channels
    # fit the output bias too; None: where the architecture holds an FFN bias natively (Llama, OPT; not
    # Gemma 3, whose GGUF and vLLM exports have no bias tensors)
    refit_bias: bool | None = None
    # with reconstruction, "obs" re-chooses each layer's FFN channels (same width) so that the refit
    # loses least (greedy OBS on the layer's Gram matrix); "score": the score's channels
    refit_choice: str = "score"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.method not in PRESETS:
            raise ConfigError(f"unknown `method` {self.method!r}: choose one of {', '.join(PRESETS)}")
        if self.score not in SCORES:
            raise ConfigError(f"unknown `score` {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.allocation == "logistic-fitted":
            raise ConfigError("logistic-fitted is the logistic `allocation` with a measured `schedule`: give "
                              "the sensitivity.json of `seap analyze sensitivity` (seap.analyze.load_schedule)")
        if self.allocation not in ALLOCATORS:
            raise ConfigError(f"unknown `allocation` {self.allocation!r}: choose one of {', '.join(ALLOCATORS)}")
        if self.heads not in HEAD_MODES:
            raise ConfigError(f"unknown `heads` mode {self.heads!r}: choose one of {', '.join(HEAD_MODES)}")
        if self.multiple is not None and self.multiple < 1:
            raise ConfigError(f"`multiple` must be a positive integer, got {self.multiple}")
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise ConfigError(f"unknown `reconstruct` mode {self.reconstruct!r}: choose one of "
                              f"{', '.join(RECONSTRUCT_MODES)}")
        if self.refit_choice not in REFIT_CHOICES:
            raise ConfigError(f"unknown `refit_choice` {self.refit_choice!r}: choose one of "
                              f"{', '.join(REFIT_CHOICES)}")
        if self.refit_choice != "score" and not self.reconstructs:
            raise ConfigError("`refit_choice` obs needs `reconstruct` refit or sequential")
        if not self.ridge >= 0:
            raise ConfigError(f"`ridge` must be >= 0 (relative to the kept channels' mean variance), got {self.ridge}")
        if not 0 < self.rho_max <= 1:
            raise ConfigError(f"`rho_max` must be in (0, 1], got {self.rho_max}")
        for name in ("protect_first", "protect_last"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {v}")
        self._take_schedule()

    def _take_schedule(self) -> None:
        """A measured schedule sets k, x0 and the dense layers: given ones must agree with it."""
        if self.schedule is None:
            return
        if isinstance(self.schedule, dict):  # as read back from a plan's record
            object.__setattr__(self, "schedule", Schedule.from_dict(self.schedule))
        if self.allocation != "logistic":
            raise ConfigError(f"a measured `schedule` shapes the logistic allocation, not {self.allocation!r}: "
                              "drop `allocation` or the `schedule`")
        sch = self.schedule
        if (self.k, self.x0) not in ((DEFAULT_K, DEFAULT_X0), (sch.k, sch.x0)):
            raise ConfigError("`k` and `x0` come from the `schedule`: drop them")
        for name in ("protect_first", "protect_last"):
            v, fitted = getattr(self, name), getattr(sch, name)
            if v is not None and v != fitted:
                raise ConfigError(f"the `schedule` was fitted with {name.replace('_', ' ')} = {fitted} dense layers, "
                                  f"not {v}: drop `{name}` or fit again with it")
        object.__setattr__(self, "k", sch.k)
        object.__setattr__(self, "x0", sch.x0)

    @classmethod
    def from_method(cls, method: str = "seap", **overrides) -> PruneConfig:
        """A preset with the user's individual choices on top (None means: keep the preset's)."""
        if method not in PRESETS:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[method], method=method)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("reconstruct", "none") == "none" and overrides.get("refit_choice") is None:
            values.pop("refit_choice", None)  # the preset's channel choice belongs to its reconstruction
        return cls(**values)

    @property
    def first(self) -> int:
        return self.protect_first if self.protect_first is not None else self._protect_default("protect_first")

    @property
    def last(self) -> int:
        return self.protect_last if self.protect_last is not None else self._protect_default("protect_last")

    def _protect_default(self, name: str) -> int:
        if self.schedule is not None:
            return getattr(self.schedule, name)  # the layers the fit left out are the layers kept dense
        return 2 if self.allocation == "logistic" else 0

    def resolve_multiple(self, widths: list[int]) -> PruneConfig:
        """The config with its width multiple fixed for a model of these FFN widths: 32 by default (Q8_0
        blocks and GPU tensor-core tiles, so exports quantise fully), 1 when the FFN is too narrow for
        such steps to leave a choice (under 512: test-size models)."""
        if self.multiple is not None:
            return self
        return self.with_(multiple=DEFAULT_MULTIPLE if min(widths) >= MIN_WIDTH_FOR_MULTIPLE else 1)

    def settings(self) -> Settings:
        """What the allocation reads (seap.core.allocation.allocate); resolve the multiple first."""
        return Settings(self.ratio, self.multiple or 1, self.first, self.last, self.k, self.x0, self.rho_max,
                        self.robust)

    @property
    def needs_stats(self) -> bool:
        return self.score not in ("magnitude", "random") or self.bias_compensation or self.reconstructs

    @property
    def reconstructs(self) -> bool:
        return self.reconstruct != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> PruneConfig:
        return replace(self, **changes)


@dataclass
class RefitConfig:
    """The reconstruction of one model (docs/design.md §2.8): what seap.pruning.refit_pass runs."""

    mode: str = "refit"
    ridge: float = 1e-2
    centered: bool = True  # fit a bias too (needs an FFN output bias in the pruned architecture)
    choice: str = "score"  # "obs": choose each layer's FFN channels (same width) for the refit

    def __post_init__(self) -> None:
        if self.choice not in REFIT_CHOICES:
            raise ConfigError(f"unknown channel choice {self.choice!r}: choose one of {', '.join(REFIT_CHOICES)}")
        if self.mode not in RECONSTRUCT_MODES:
            raise ConfigError(f"unknown reconstruction {self.mode!r}: choose one of {', '.join(RECONSTRUCT_MODES)}")
        if self.ridge < 0:
            raise ConfigError(f"the ridge term must be >= 0, got {self.ridge}")

    @classmethod
    def of(cls, cfg: PruneConfig, adapter, config) -> RefitConfig:
        """The pruning config's reconstruction for a model (`config`: its transformers config)."""
        bias = cfg.refit_bias if cfg.refit_bias is not None else adapter.supports_native_ffn_out_bias(config)
        return cls(cfg.reconstruct, cfg.ridge, bias, cfg.refit_choice)


DEFAULT_TASKS = ("default",)  # the embedded corpus: no download, no data folder


@dataclass(frozen=True)
class CalibrationData:
    """What the statistics (and the reconstruction) are computed on: task corpora (task names, 'default',
    'default:<family>' or corpus files), where their rows are, and how they are batched."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: str | None = None  # local copies as <task>/<split>.parquet; None: the Hugging Face hub
    limit: int | None = None  # examples per task (seeded subset); None: all
    batch_size: int = 8
    max_length: int = 512  # tokens per calibration text
    stats_dir: str | None = None  # where statistics are cached (None: <out>/stats)

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(str(t) for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        if self.stats_dir is not None:
            object.__setattr__(self, "stats_dir", str(self.stats_dir))
        if not tasks:
            raise ConfigError("calibration needs at least one task corpus (`tasks`): e.g. 'default', a task name "
                              "or a .txt/.jsonl file")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"a task is named twice in {list(tasks)}: name each once")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ConfigError(f"`limit` must be >= 1 examples per task, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ConfigError(f"`max_length` must be >= 1 token, got {self.max_length}")

    @classmethod
    def of(cls, data: CalibrationData | str | tuple | list | None) -> CalibrationData:
        """`data` as given to `seap.prune`: a CalibrationData, task names, or None (the embedded corpus)."""
        if data is None:
            return cls()
        return data if isinstance(data, cls) else cls(tasks=data)

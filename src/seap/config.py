"""Pruning configuration as validated, frozen data: a PruneConfig composed of its parts (score,
allocation, reconstruction, generic weights), each validated once, and the method presets as values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .core.allocation import ALLOCATORS, DEFAULT_K, DEFAULT_X0, Schedule, Settings, check_ratio
from .core.scores import SCORES
from .errors import ConfigError

HEAD_MODES = ("auto", "none", "heads", "kv_groups")
DEFAULT_MULTIPLE = 32
MIN_WIDTH_FOR_MULTIPLE = 512
RECONSTRUCT_MODES = ("none", "refit", "sequential")
REFIT_CHOICES = ("auto", "score", "obs")


@dataclass(frozen=True)
class ScoreConfig:
    """How a layer's units are ranked: the score, which attention units compete, FLAP's bias."""

    name: str = "wifn"
    heads: str = "auto"  # auto: heads for multi-head attention, FFN only for GQA
    bias_compensation: bool = False

    def __post_init__(self) -> None:
        if self.name not in SCORES:
            raise ConfigError(f"unknown `score` {self.name!r}: choose one of {', '.join(SCORES)}")
        if self.heads not in HEAD_MODES:
            raise ConfigError(f"unknown `heads` mode {self.heads!r}: choose one of {', '.join(HEAD_MODES)}")


@dataclass(frozen=True)
class AllocationConfig:
    """How the removal is spread over layers: the allocation and its schedule's shape."""

    name: str = "logistic"
    protect_first: int | None = None  # None: the allocation's default (logistic 2, others 0)
    protect_last: int | None = None
    k: float = DEFAULT_K
    x0: float = DEFAULT_X0
    rho_max: float = 0.9
    robust: bool = False
    multiple: int | None = None  # None: 32 for real models (FFNs >= 512 wide), 1 for tiny ones (resolve_multiple)
    # a logistic schedule measured on this model (seap.analyze.schedule.load_schedule): its k, x0 and
    # dense layers replace the defaults; allocation "logistic" only
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        if self.name == "logistic-fitted":
            raise ConfigError("logistic-fitted is the logistic `allocation` with a measured `schedule`: give "
                              "the sensitivity.json of `seap analyze sensitivity` (seap.analyze.load_schedule)")
        if self.name not in ALLOCATORS:
            raise ConfigError(f"unknown `allocation` {self.name!r}: choose one of {', '.join(ALLOCATORS)}")
        if self.multiple is not None and self.multiple < 1:
            raise ConfigError(f"`multiple` must be a positive integer, got {self.multiple}")
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
        if self.name != "logistic":
            raise ConfigError(f"a measured `schedule` shapes the logistic allocation, not {self.name!r}: "
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

    @property
    def first(self) -> int:
        return self.protect_first if self.protect_first is not None else self._protect_default("protect_first")

    @property
    def last(self) -> int:
        return self.protect_last if self.protect_last is not None else self._protect_default("protect_last")

    def _protect_default(self, name: str) -> int:
        if self.schedule is not None:
            return getattr(self.schedule, name)  # the layers the fit left out are the layers kept dense
        return 2 if self.name == "logistic" else 0

    def settings(self, ratio: float) -> Settings:
        """What the allocation reads (seap.core.allocation.allocate); resolve the multiple first."""
        return Settings(ratio, self.multiple or 1, self.first, self.last, self.k, self.x0, self.rho_max, self.robust)


@dataclass(frozen=True)
class RefitConfig:
    """Training-free reconstruction (docs/design.md §2.8): "none", "refit" (least squares on the dense
    model's activations) or "sequential" (each layer on the outputs of the pruned layers before it)."""

    mode: str = "none"
    ridge: float = 1e-2  # relative to the mean variance of the kept channels
    # fit the output bias too; None: where the architecture holds an FFN bias natively (Llama, OPT; not
    # Gemma 3, whose GGUF and vLLM exports have no bias tensors): resolved()
    centered: bool | None = None
    # "obs" re-chooses each layer's FFN channels (same width) so that the refit loses least (greedy OBS
    # on the layer's Gram matrix); "score": the score's channels; "auto": obs for an expert calibrated on
    # a task's own prompts, score for one that serves any prompt (for_expert)
    choice: str = "score"
    # with the OBS choice: the channels it may remove are the score's lowest obs_pool x (the channels the
    # layer loses), so the score's ranking bounds OBS's search; None: any channel
    obs_pool: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in RECONSTRUCT_MODES:
            raise ConfigError(f"unknown `reconstruct` mode {self.mode!r}: choose one of {', '.join(RECONSTRUCT_MODES)}")
        if self.choice not in REFIT_CHOICES:
            raise ConfigError(f"unknown `refit_choice` {self.choice!r}: choose one of {', '.join(REFIT_CHOICES)}")
        if self.choice == "obs" and self.mode == "none":
            raise ConfigError("`refit_choice` obs needs `reconstruct` refit or sequential")
        if self.obs_pool is not None and not self.obs_pool >= 1:
            raise ConfigError(f"`obs_pool` must be >= 1 (a multiple of the channels removed) or None, got {self.obs_pool}")
        if self.obs_pool is not None and self.choice == "score":
            raise ConfigError("`obs_pool` bounds the OBS choice: drop it, or choose `refit_choice` obs")
        if not self.ridge >= 0:
            raise ConfigError(f"`ridge` must be >= 0 (relative to the kept channels' mean variance), got {self.ridge}")

    @property
    def runs(self) -> bool:
        return self.mode != "none"

    def for_expert(self, in_domain: bool) -> RefitConfig:
        """The choice "auto" settled for one expert. OBS fits the channels to the calibration text's own
        outputs: a gain where the prompts are of that text's kind (a task expert on its task's train
        split, 99.5% of dense at 20%); for an expert that serves every prompt it lost on a small corpus
        (the embedded corpus's first 12k tokens) and won on the shipped 56k (benchmarks/RESULTS.md,
        "Calibration size and source"), so the presets take "obs" and "auto" is the cautious option for
        a small corpus file."""
        if self.choice != "auto":
            return self
        return replace(self, choice="obs") if in_domain else replace(self, choice="score", obs_pool=None)

    def resolved(self, adapter, config) -> RefitConfig:
        """This reconstruction for one model (`config`: its transformers config): the bias decided."""
        if self.centered is not None:
            return self
        return replace(self, centered=bool(adapter.supports_native_ffn_out_bias(config)))


@dataclass(frozen=True)
class GenericWeights:
    """The weight of each corpus in the generic expert's combined scores: language-modelling corpora
    (LM_CORPORA) and the rest."""

    lm: float = 3.0
    task: float = 2.0

    def __post_init__(self) -> None:
        if not (self.lm >= 0 and self.task >= 0 and self.lm + self.task > 0):
            raise ConfigError(f"the generic expert's weights (`lm_weight`, `task_weight`) must be >= 0 and not both 0, "
                              f"got {self.lm} and {self.task}")


# The flat keywords of from_method (and of plans written before the configs were composed): where each lives.
_FLAT = {"score": ("score", "name"), "heads": ("score", "heads"), "bias_compensation": ("score", "bias_compensation"),
         "allocation": ("allocation", "name"), **{k: ("allocation", k) for k in (
             "protect_first", "protect_last", "k", "x0", "rho_max", "robust", "multiple", "schedule")},
         "reconstruct": ("refit", "mode"), "ridge": ("refit", "ridge"), "refit_bias": ("refit", "centered"),
         "refit_choice": ("refit", "choice"), "obs_pool": ("refit", "obs_pool"), "lm_weight": ("weights", "lm"), "task_weight": ("weights", "task")}
_PARTS = {"score": ScoreConfig, "allocation": AllocationConfig, "refit": RefitConfig, "weights": GenericWeights}


@dataclass(frozen=True)
class PruneConfig:
    """A pruning run: the ratio, the method's name, and its parts (each validated on its own)."""

    ratio: float = 0.5
    method: str = "seap"
    score: ScoreConfig = field(default_factory=ScoreConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    generic: bool = False  # whether the plan's default expert is the generic one (all tasks combined)
    weights: GenericWeights = field(default_factory=GenericWeights)
    seed: int = 0  # the random score's draw and the calibration texts' seeded subset

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.method not in PRESETS and PRESETS:  # PRESETS is empty while the presets themselves are built
            raise ConfigError(f"unknown `method` {self.method!r}: choose one of {', '.join(PRESETS)}")
        for name, kind in _PARTS.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"`{name}` must be a {kind.__name__} (or give flat keywords to "
                                  f"PruneConfig.from_method), got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_method(cls, method: str = "seap", **overrides) -> PruneConfig:
        """A preset with the user's individual choices on top, as flat keywords (score="wanda_sp",
        ridge=0.1, ...; None means: keep the preset's)."""
        if method not in PRESETS:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("reconstruct", PRESETS[method].refit.mode) == "none" and "refit_choice" not in given:
            given["refit_choice"] = "score"  # the preset's channel choice belongs to its reconstruction
        if given.get("refit_choice") == "score" and "obs_pool" not in given:
            given["obs_pool"] = None  # so does the preset's bound on the OBS search
        return PRESETS[method].with_(**given)

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        """A config as a plan records it: composed (to_dict), or flat as plans written before wrote it."""
        data = dict(data)
        if not any(isinstance(data.get(name), dict) for name in _PARTS):
            data.pop("fitted", None)  # an early record's name of the schedule
            # on the field defaults, not the method's preset: a setting an old record lacks did not exist then
            return cls(method=data.pop("method", "seap")).with_(**data)
        parts = {name: _PARTS[name](**data.pop(name)) for name in _PARTS if name in data}
        return cls(**data, **parts)

    def with_(self, **changes) -> PruneConfig:
        """This config with changes given as top-level fields or flat keywords (routed to their part)."""
        top, parts = {}, {}
        for key, value in changes.items():
            if key in _FLAT and not isinstance(value, _PARTS.get(key, ())):  # score="wifn", not a ScoreConfig
                part, name = _FLAT[key]
                parts.setdefault(part, {})[name] = value
            elif key in {f.name for f in fields(self)}:
                top[key] = value
            else:
                raise ConfigError(f"unknown pruning setting {key!r}: choose among "
                                  f"{', '.join(sorted({f.name for f in fields(self)} | set(_FLAT)))}")
        for part, vals in parts.items():
            top[part] = replace(top.get(part, getattr(self, part)), **vals)
        return replace(self, **top)

    def resolve_multiple(self, widths: list[int]) -> PruneConfig:
        """The config with its width multiple fixed for a model of these FFN widths: 32 by default (Q8_0
        blocks and GPU tensor-core tiles, so exports quantise fully), 1 when the FFN is too narrow for
        such steps to leave a choice (under 512: test-size models)."""
        if self.allocation.multiple is not None:
            return self
        return self.with_(multiple=DEFAULT_MULTIPLE if min(widths) >= MIN_WIDTH_FOR_MULTIPLE else 1)

    def settings(self) -> Settings:
        """What the allocation reads (seap.core.allocation.allocate); resolve the multiple first."""
        return self.allocation.settings(self.ratio)

    @property
    def needs_stats(self) -> bool:
        return self.score.name not in ("magnitude", "random") or self.score.bias_compensation or self.reconstructs

    @property
    def reconstructs(self) -> bool:
        return self.refit.runs

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, PruneConfig] = {}
# seap's defaults add training-free reconstruction to the paper's recipe: a least-squares refit of each
# layer's output projection with every expert's channels re-chosen for it (greedy OBS). On the embedded
# corpus at its shipped size (56k tokens) OBS beats the score's channels for the generic expert too, in
# three of the four acceptance cells (at its first size, 12k tokens, it lost; benchmarks/RESULTS.md,
# "Calibration size and source"); "auto" keeps the score's channels for experts of no named task.
_RECONSTRUCTION = RefitConfig("refit", choice="obs")
PRESETS.update({
    # SEAP: task statistics, logistic layer schedule, reconstruction; the plan's task expert is used.
    "seap": PruneConfig(method="seap", refit=_RECONSTRUCTION),
    # SEAP-gen: the generic expert that combines all tasks' statistics.
    "seap-gen": PruneConfig(method="seap-gen", generic=True, refit=_RECONSTRUCTION),
    # The paper's exact recipe (s_W score, logistic schedule, no reconstruction).
    "seap-paper": PruneConfig(method="seap-paper"),
    "seap-gen-paper": PruneConfig(method="seap-gen-paper", generic=True),
    "wanda-sp": PruneConfig(method="wanda-sp", score=ScoreConfig("wanda_sp"), allocation=AllocationConfig("uniform")),
    "flap": PruneConfig(method="flap", score=ScoreConfig("wifv", bias_compensation=True),
                        allocation=AllocationConfig("adaptive")),
    "magnitude": PruneConfig(method="magnitude", score=ScoreConfig("magnitude"), allocation=AllocationConfig("uniform")),
    "random": PruneConfig(method="random", score=ScoreConfig("random"), allocation=AllocationConfig("uniform")),
})


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

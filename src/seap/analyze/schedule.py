"""The schedule `seap analyze sensitivity` fitted, as an input of `seap prune --schedule`
(`--allocation logistic-fitted`): read from its sensitivity.json, refused on another model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import PruneConfig
from ..errors import ArtifactError
from ..models import LoadedModel, check_fingerprint

SENS_FORMAT = "seap-sensitivity"
SENS_VERSION = 1
DEFAULT_K, DEFAULT_X0 = 1.2, 0.3  # SEAP's default logistic, drawn for comparison


@dataclass(frozen=True)
class FittedSchedule:
    """The (k, x0) of `seap analyze sensitivity` and what they were fitted on."""

    k: float
    x0: float
    protect_first: int
    protect_last: int
    metric: str
    ratios: tuple[float, ...]
    model: str
    fingerprint: dict
    file: str | None = None

    def record(self) -> dict:
        """What a plan records (PruneConfig.fitted): the parameters and their origin, not the weights' signature."""
        return {"k": self.k, "x0": self.x0, "protect_first": self.protect_first, "protect_last": self.protect_last,
                "metric": self.metric, "ratios": list(self.ratios), "model": self.model,
                "arch_hash": self.fingerprint.get("arch_hash"), "file": self.file}

    def configure(self, config: PruneConfig, lm: LoadedModel | None = None) -> PruneConfig:
        """`config` with the logistic-fitted allocation; refused when `lm` is not the model it was fitted on."""
        if lm is not None:
            check_fingerprint(self.fingerprint, lm.model, lm.adapter, "fitted schedule", weights=lm.weights)
        return config.with_(allocation="logistic-fitted", k=self.k, x0=self.x0, fitted=self.record())


def load_schedule(path: str | Path) -> FittedSchedule:
    """The fitted schedule in a sensitivity.json (or the folder that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sensitivity.json"
    fix = "give the sensitivity.json that `seap analyze sensitivity --out DIR` wrote"
    if not path.is_file():
        raise ArtifactError(f"schedule file {path} does not exist: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ArtifactError(f"schedule file {path} is corrupt ({str(err)[:60]}): run the analysis again") from None
    if not isinstance(data, dict) or data.get("format") != SENS_FORMAT:
        raise ArtifactError(f"{path} is not a seap sensitivity file: {fix}")
    if data.get("version") != SENS_VERSION:
        raise ArtifactError(f"{path} has sensitivity format version {data.get('version')}, this seap reads "
                            f"{SENS_VERSION}: run the analysis again")
    try:
        s = data["schedule"]
        return FittedSchedule(float(s["k"]), float(s["x0"]), int(s["protect_first"]), int(s["protect_last"]),
                              str(s["metric"]), tuple(s["ratios"]), str(data["model"]), dict(data["fingerprint"]),
                              str(path))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"schedule file {path} is incomplete (missing {err}): run the analysis again") from None

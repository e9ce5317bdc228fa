"""The schedule `seap analyze sensitivity` fitted, as an input of `seap prune --schedule`: read from its
sensitivity.json into a `seap.core.allocation.Schedule` (PruneConfig.schedule); pruning refuses it on another model."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.allocation import DEFAULT_K, DEFAULT_X0, Schedule  # noqa: F401  (DEFAULT_*: drawn for comparison)
from ..errors import ArtifactError
from ..outputs import check_header

SENS_FORMAT = "seap-sensitivity"
SENS_VERSION = 1


def load_schedule(path: str | Path) -> Schedule:
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
    check_header(data, path, kind="sensitivity", fmt=SENS_FORMAT, version=SENS_VERSION, redo="run the analysis again",
                 instead=fix)
    try:
        s = data["schedule"]
        fp = dict(data["fingerprint"])
        source = {"metric": str(s["metric"]), "ratios": list(s["ratios"]), "model": str(data["model"]),
                  "arch_hash": fp.get("arch_hash"), "file": str(path), "fingerprint": fp}
        return Schedule(float(s["k"]), float(s["x0"]), int(s["protect_first"]), int(s["protect_last"]), source)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"schedule file {path} is incomplete (missing {err}): run the analysis again") from None

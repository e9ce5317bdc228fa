"""seap: training-free pruning of LLM feed-forward experts (SEAP, GRIFFIN and baselines).

    import seap

    result = seap.prune("smollm2-135m", seap.PruneConfig.from_method("seap", ratio=0.5), out="seap-out")
    lm = seap.load("seap-out")                      # the pruned model (or any model id / folder)
    report = seap.evaluate(lm, seap.EvalConfig(limit=100))

The names below are imported on first use, so `import seap` stays light (no torch until needed).
See docs/design.md for the algorithms and artifacts.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__

# public name -> module that defines it
_API = {
    "prune": "pruning.prune", "collect": "pruning.prune", "apply": "pruning.prune", "PruneResult": "pruning.prune",
    "load": "api", "evaluate": "api", "info": "api", "generate": "api", "benchmark": "api",
    "fit_router": "api", "evaluate_router": "api", "explain": "api", "export": "api",
    "PruneConfig": "config", "ScoreConfig": "config", "AllocationConfig": "config", "RefitConfig": "config",
    "GenericWeights": "config", "CalibrationData": "config", "EvalConfig": "evaluation.runner",
    "Runtime": "model.runtime", "GriffinConfig": "inference.griffin", "RouterConfig": "inference.router",
    "Plan": "pruning.plan", "LoadedModel": "model.loading", "SeapError": "errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'seap' has no attribute {name!r}")
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""Architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from ...errors import ModelError
from .base import Adapter, HeadGeometry
from .families import Gemma3Adapter, LlamaAdapter, OPTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, Gemma3Adapter, OPTAdapter)
_BY_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def adapter_for_config(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    cls = _BY_TYPE.get(model_type)
    if cls is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}: seap supports {', '.join(supported_model_types())} "
            "(adapters live in seap/model/adapters; add one for a new family)"
        )
    return cls()


def get_adapter(model: nn.Module) -> Adapter:
    return adapter_for_config(model.config)


__all__ = ["ADAPTERS", "Adapter", "HeadGeometry", "adapter_for_config", "get_adapter", "supported_model_types"]

"""Fingerprints of a base model: what a plan, statistics, a router or a fitted schedule was made for.

The architecture key (shapes only, so an empty skeleton gives the same key as the loaded model) is
hashed; a few strided weights per layer tell two checkpoints of one architecture apart, compared with
a tolerance so that the same weights in another dtype still match.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..errors import ArtifactError
from .adapters import Adapter
from .weights import ModuleWeights, WeightSource


def architecture_key(model: nn.Module, adapter: Adapter) -> dict:
    """The geometry a plan depends on: any mismatch makes its indices meaningless (shapes only:
    an empty skeleton gives the same key as the loaded model)."""
    layers = adapter.layers(model)
    g = adapter.head_geometry(layers[0])
    return {
        "model_type": model.config.model_type,
        "n_layers": len(layers),
        "hidden_size": adapter.hidden_size(model),
        "d_ff": [adapter.d_ff(layer) for layer in layers],
        "heads": [adapter.head_geometry(layer).num_heads for layer in layers],
        "kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "vocab_size": int(adapter.embeddings(model).num_embeddings),
    }


def fingerprint(model: nn.Module, adapter: Adapter, weights: WeightSource | None = None) -> dict:
    """Geometry hash plus a few strided weights per layer (tells two checkpoints of one architecture
    apart; compared with a tolerance, so the same weights in another dtype still match)."""
    arch = architecture_key(model, adapter)
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    weights = weights or ModuleWeights(model, adapter)
    signature = [v for i in range(arch["n_layers"]) for v in weights.signature(i)]
    return {"arch": arch, "arch_hash": digest, "signature": signature}


def check_fingerprint(expected: dict, model: nn.Module, adapter: Adapter, what: str = "plan",
                      weights: WeightSource | None = None) -> None:
    """Refuse a plan or statistics made for another base model."""
    got = fingerprint(model, adapter, weights)
    if expected.get("arch_hash") != got["arch_hash"]:
        diff = {k: (expected.get("arch", {}).get(k), v) for k, v in got["arch"].items()
                if expected.get("arch", {}).get(k) != v}
        brief = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in list(diff.items())[:3])
        raise ArtifactError(f"this {what} was made for another model ({brief}): use it with the base model it "
                            "was made from (seap info shows which)")
    a = torch.tensor(expected.get("signature", []), dtype=torch.float64)
    b = torch.tensor(got["signature"], dtype=torch.float64)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=2e-3 * float(b.abs().max() + 1e-12)):
        raise ArtifactError(f"this {what} was made for a model of the same shape but different weights: "
                            "use it with the base model it was made from (seap info shows which)")

"""The skeleton: a model whose parameters live on the meta device (no memory), and the loader that
reads any of its tensors from a checkpoint's shards onto a device and sends them back to meta. The
layer-by-layer pass, streaming export, reconstruction and loading all stand on it."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ModelError
from .adapters import Adapter
from .checkpoint import Checkpoint
from .weights import CheckpointWeights, LayerWeights, signature_positions


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (no memory); buffers are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config leaves a tied LM head untied; the saved folder must not hold it twice
    return model.eval()


class SkeletonLoader:
    """Maps a skeleton's parameter names to a checkpoint's tensor names and moves tensors in and out."""

    def __init__(self, model: nn.Module, adapter: Adapter, ckpt: Checkpoint):
        self.model, self.adapter, self.ckpt = model, adapter, ckpt
        self.layers = adapter.layers(model)
        self.layer_prefix = next(n for n, m in model.named_modules() if m is self.layers) + "."
        prefix = getattr(model, "base_model_prefix", "model")
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.names: dict[str, str] = {}
        missing = []
        for name, _ in model.named_parameters():
            found = next((c for c in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if c in ckpt), None)
            if found is None:
                if tied and name.endswith("lm_head.weight"):
                    continue
                missing.append(name)
                continue
            self.names[name] = found
        if missing:
            raise ModelError(f"checkpoint {ckpt.folder} lacks {len(missing)} tensor(s) the config describes, e.g. "
                             f"{missing[0]}: is config.json the one that goes with these shards?")
        self.resident_max = 0

    def layer_params(self, i: int) -> list[str]:
        p = f"{self.layer_prefix}{i}."
        return [n for n, _ in self.model.named_parameters() if n.startswith(p)]

    def other_params(self) -> list[str]:
        """The decoder body's parameters outside its layers (embeddings, positions, final norm): what
        the catch pass runs. Not the LM head: an 8B model's is 1 GB in bf16 that statistics never use."""
        body = getattr(self.model, "base_model_prefix", "")
        inside = f"{body}." if body and hasattr(self.model, body) else ""
        return [n for n, _ in self.model.named_parameters()
                if not n.startswith(self.layer_prefix) and n.startswith(inside)]

    def load(self, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        from accelerate.utils import set_module_tensor_to_device

        names = [n for n in names if n in self.names]
        values = self.ckpt.read([self.names[n] for n in names], dtype=dtype)
        for n in names:
            set_module_tensor_to_device(self.model, n, device, value=values.pop(self.names[n]))
        self.resident_max = max(self.resident_max, self.resident_layers())

    def release(self, names: Sequence[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            set_module_tensor_to_device(self.model, n, "meta")

    def resident_layers(self) -> int:
        """Decoder layers holding real weights now (the layer-by-layer pass keeps this at 1)."""
        return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in self.layers)

    def read_out_weight(self, i: int, kind: str) -> torch.Tensor:
        lin = self.adapter.ffn_out(self.layers[i]) if kind == "ffn" else self.adapter.attn_out(self.layers[i])
        name = next(n for n, p in self.model.named_parameters() if p is lin.weight)
        return self.ckpt.read([self.names[name]])[self.names[name]]

    def signatures(self) -> list[list[float]]:
        """Fingerprint samples of every layer, read element by element (no whole tensor is loaded)."""
        out = []
        for i, layer in enumerate(self.layers):
            w = self.adapter.ffn_out(layer).weight
            name = next(n for n, p in self.model.named_parameters() if p is w)
            out.append(self.ckpt.read_elements(self.names[name], signature_positions(w.numel())))
        return out

    def summaries(self, device: torch.device, dtype: torch.dtype) -> list[LayerWeights]:
        """Weight norms of every layer, loading one layer at a time (when no calibration pass ran)."""
        out = []
        for i in tqdm(range(len(self.layers)), desc="reading weight norms", unit="layer", leave=False):
            names = self.layer_params(i)
            self.load(names, device, dtype)
            out.append(LayerWeights.of_layer(self.layers[i], self.adapter))
            self.release(names)
        return out

    def weights(self, summaries: list[LayerWeights] | None = None, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> CheckpointWeights:
        return CheckpointWeights(summaries, self.signatures, self.read_out_weight,
                                 lambda: self.summaries(device or torch.device("cpu"), dtype or torch.float32))

"""What the exporters read: a model's geometry and config plus its tensors, one at a time.

A model loaded in memory (the bundled GGUF models, small models) is read from memory. A folder of
safetensors (a pruned folder, a base checkpoint with a plan, or a dense checkpoint) is streamed:
the geometry comes from a meta skeleton at the final widths, the values from the shards, one
decoder layer at a time (seap.pruning.streaming), so a 70B export holds one layer, not the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import ArtifactError, ModelError
from ..model.adapters import Adapter, adapter_for_config
from ..model.checkpoint import Checkpoint, TensorSpec
from ..model.fingerprints import check_fingerprint
from ..model.loading import LoadedModel, ModelSource, is_open, local_folder, open_model, resolve_model, use_or_open
from ..model.pruned_folder import is_pruned_folder, model_tensors, pruned_skeleton, tensor_specs
from ..model.tokenizer import load_tokenizer
from ..pruning.streaming import TensorStream, stream_pruned_tensors, stream_tensors


@dataclass
class ExportSource:
    """`model` gives config and geometry (the model in memory, or a meta skeleton); `tensors()`
    yields (name, tensor) in the order of `specs`, as the saved folder names them."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: ModelSource
    dtype: torch.dtype  # of the floating values (what a vLLM folder is written in)
    specs: list[TensorSpec]
    stream: TensorStream | None = None  # None: read from the model in memory
    max_resident_layers: int | None = None  # decoder layers held at once while streaming
    _used: bool = field(default=False, repr=False)

    @classmethod
    def of(cls, lm: LoadedModel) -> ExportSource:
        tensors = model_tensors(lm.model)
        if any(t.device.type == "meta" for _, t in tensors):  # accelerate's CPU/disk offload keeps them elsewhere
            raise ModelError("parts of this model are offloaded by its device map (weights on the meta device): "
                             "export the folder without --load whole and --device-map; it streams from the shards")
        dtype = lm.save_dtype  # the checkpoint's own, whatever the model was computed in
        return cls(lm.model, lm.tokenizer, lm.adapter, lm.source, dtype, tensor_specs(lm.model, dtype))

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The values, once for a streamed source (its shards are read as they are consumed)."""
        if self.stream is None:
            for (name, t), spec in zip(model_tensors(self.model), self.specs):
                yield name, t.detach().to(spec.dtype)
            return
        if self._used:
            raise RuntimeError("a streamed export source is read once: open it again to export it again")
        self._used = True
        try:
            yield from self.stream.tensors
        finally:
            self.stream.close()
            self.max_resident_layers = self.stream.max_resident_layers


def as_source(model: str | LoadedModel | ExportSource, runtime=None) -> ExportSource:
    """A LoadedModel is read from memory; a name or path streams when it is a safetensors folder."""
    if isinstance(model, ExportSource):
        return model
    if is_open(model):
        return ExportSource.of(use_or_open(model))
    return open_source(model, runtime) or ExportSource.of(open_model(model, runtime))


def open_source(model: str, runtime=None, plan=None, expert: str | None = None) -> ExportSource | None:
    """A streamed source for a local safetensors folder (a hub id is downloaded first): the pruned
    folder as it is, or the base checkpoint cut by `plan`; None for anything else (GGUF files, the
    bundled models, .bin weights) and under `--load whole`: those are loaded whole."""
    from ..model.runtime import Runtime

    rt = runtime or Runtime()
    if rt.load == "whole":
        return None
    src = resolve_model(model)
    folder = local_folder(src)
    if folder is None:
        return None
    if is_pruned_folder(folder):
        if plan is not None:
            raise ArtifactError(f"{folder} is already pruned (seap_pruning in its config.json): --plan applies to "
                                "the base model; export the folder without --plan")
        return _pruned_source(folder, src, rt)
    # Statistics' layer-by-layer machinery: a meta skeleton + the checkpoint, shards checked.
    lazy = open_model(src, dataclasses.replace(rt, load="layerwise"), streamable=True)
    config, ckpt = lazy.model.config, lazy.checkpoint
    dtype = ckpt.dtype  # tensors are copied, not computed with: they keep the checkpoint's dtype
    if plan is not None:
        from ..pruning.plan import Plan

        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        check_fingerprint(plan.meta.fingerprint, lazy.model, lazy.adapter, weights=lazy.weights)
        stream = _checked(stream_pruned_tensors(ckpt, config, plan, expert, dtype), ModelError,
                          "download the checkpoint again")
    else:
        from ..model.skeleton import empty_model

        stream = _checked(stream_tensors(ckpt, lazy.model, empty_model(config, dtype), lazy.adapter, dtype),
                          ModelError, "download the checkpoint again")
    _generation_config(stream.layout, folder)
    return ExportSource(stream.layout, lazy.tokenizer, lazy.adapter, src, dtype, stream.specs, stream)


def _pruned_source(folder: Path, src: ModelSource, rt) -> ExportSource:
    try:
        ckpt = Checkpoint.open(folder)
    except ModelError as err:
        raise ArtifactError(str(err)) from None  # Checkpoint's fix already says to prune again
    dtype = ckpt.dtype  # copied, not computed with
    layout = pruned_skeleton(folder, dtype)
    adapter = adapter_for_config(layout.config)
    try:
        stream = _checked(stream_tensors(ckpt, layout, pruned_skeleton(folder, dtype), adapter, dtype),
                          ArtifactError, "prune again")
    except ModelError as err:  # a tensor the recorded layout has and the shards lack
        raise ArtifactError(f"{err} (a pruned folder: prune again)") from None
    _generation_config(layout, folder)
    try:
        tokenizer = load_tokenizer(folder)
    except OSError as err:
        raise ArtifactError(f"{folder} has no usable tokenizer ({str(err).splitlines()[0]}): prune again") from None
    if getattr(tokenizer, "pad_token_id", None) is None:  # as load_model sets it: the saved tokenizer must match
        tokenizer.pad_token = tokenizer.eos_token
    return ExportSource(layout, tokenizer, adapter, src, dtype, stream.specs, stream)


def _checked(stream: TensorStream, error: type[Exception], fix: str) -> TensorStream:
    """Refuse shards whose shapes differ from the skeleton's before anything is written (else the
    mismatch would surface deep inside accelerate halfway through the export)."""
    loader = stream.loader
    shapes = dict(loader.model.named_parameters())
    wrong = [n for n, c in loader.names.items() if tuple(shapes[n].shape) != loader.ckpt.tensors[c].shape]
    if wrong:
        n, c = wrong[0], loader.names[wrong[0]]
        raise error(f"{loader.ckpt.folder}: tensor {c} has shape {loader.ckpt.tensors[c].shape} but its config says "
                    f"{tuple(shapes[n].shape)} ({len(wrong)} such tensors): {fix}")
    return stream


def _generation_config(layout: nn.Module, folder: Path) -> None:
    """The folder's own generation config, as from_pretrained would load it (the skeleton has defaults)."""
    if (folder / "generation_config.json").is_file() and getattr(layout, "generation_config", None) is not None:
        from transformers import GenerationConfig

        try:
            layout.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError):
            pass  # a broken generation config is not the export's business: the defaults stay

"""Slicing and saving a checkpoint that is not in memory (docs/design.md §2.9): layer by layer from its shards.

The pruned layout (config, every tensor's name and shape) comes from slicing an empty skeleton
with the plan; the values come from a second skeleton whose decoder layers are loaded one at a
time from the source shards, cut by the same `slice_layer` as the in-memory path, streamed to
the output shards and freed. Tensors outside the layers are copied as they are. The result equals,
tensor for tensor, what the in-memory path writes from the same checkpoint and plan.

`stream_tensors` is that stream on its own (any consumer: the pruned-folder writer here, the
GGUF and vLLM exporters); `stream_pruned_tensors` is it with the plan's cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.adapters import Adapter, adapter_for_config
from ..model.checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, TensorSpec
from ..model.pruned_folder import model_tensors, tensor_specs, write_pruned_folder
from ..model.skeleton import SkeletonLoader, empty_model
from .plan import Plan
from .surgery import slice_layer, slice_model


@dataclass
class TensorStream:
    """A model's tensors read one decoder layer at a time: iterate `tensors` once; it yields
    (name, tensor) in the order of `specs`."""

    layout: nn.Module  # meta skeleton of what comes out: config, widths, parameter counts
    specs: list[TensorSpec]
    tensors: Iterator[tuple[str, torch.Tensor]]
    loader: SkeletonLoader

    @property
    def max_resident_layers(self) -> int:
        return self.loader.resident_max

    def close(self) -> None:
        """Stop early: the loaded layer goes back to the meta device (exhaustion does it too)."""
        self.tensors.close()


def stream_tensors(ckpt: Checkpoint, layout: nn.Module, work: nn.Module, adapter: Adapter, dtype: torch.dtype,
                   cut: Callable[[nn.Module, int], object] | None = None, *, progress: bool = False,
                   desc: str = "streaming") -> TensorStream:
    """The tensors of `layout` (a meta skeleton) with values from `ckpt`: each decoder layer of `work`
    (a second meta skeleton, shaped as the checkpoint) is loaded on the CPU in `dtype`, cut by
    `cut(layer, i)` when given, yielded tensor by tensor and freed; tensors outside the layers are
    read one at a time. Floating tensors come in `dtype`."""
    loader = SkeletonLoader(work, adapter, ckpt)
    specs = tensor_specs(layout, dtype)
    return TensorStream(layout, specs, _values(ckpt, loader, specs, dtype, cut, progress, desc), loader)


def _values(ckpt: Checkpoint, loader: SkeletonLoader, specs: list[TensorSpec], dtype: torch.dtype, cut,
            progress: bool, desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = loader.layer_prefix
    buffers = dict(model_tensors(loader.model))
    bar = tqdm(total=len(loader.layers), desc=desc, unit="layer", disable=not progress)
    current, params = None, {}
    try:
        for spec in specs:
            name = spec.name
            if name.startswith(prefix):
                i = int(name[len(prefix):].split(".", 1)[0])
                if i != current:
                    if current is not None:
                        loader.layers[current].to("meta")
                        bar.update()
                    loader.load(loader.layer_params(i), torch.device("cpu"), dtype)
                    if cut is not None:
                        cut(loader.layers[i], i)
                    params = {f"{prefix}{i}.{n}": p for n, p in loader.layers[i].named_parameters()}
                    current = i
                yield name, params[name].detach().to(spec.dtype)
            elif name in loader.names:
                yield name, ckpt.read([loader.names[name]])[loader.names[name]].to(spec.dtype)
            else:  # a persistent buffer the skeleton computed itself
                yield name, buffers[name].detach().to(spec.dtype)
    finally:  # also when the consumer stops early: nothing of the layer stays in memory
        if current is not None:
            loader.layers[current].to("meta")
            bar.update()
        bar.close()


def stream_pruned_tensors(ckpt: Checkpoint, config, plan: Plan, expert: str | None, dtype: torch.dtype, *,
                          progress: bool = False, desc: str = "slicing") -> TensorStream:
    """`ckpt` pruned to the plan's expert, as a stream: the layout is an empty skeleton sliced by the
    plan, the values each source layer cut by `slice_layer` (as the in-memory path cuts it)."""
    adapter = adapter_for_config(config)
    layout = empty_model(config, dtype)
    slice_model(layout, adapter, plan, expert, check=False)
    _, ex = plan.expert(expert)
    return stream_tensors(ckpt, layout, empty_model(config, dtype), adapter, dtype,
                          lambda layer, i: slice_layer(layer, adapter, ex, i, plan.head_unit),
                          progress=progress, desc=desc)


@dataclass
class StreamedWrite:
    folder: Path
    layout: torch.nn.Module  # the pruned skeleton (meta tensors): config, widths, parameter counts
    bytes_written: int
    max_resident_layers: int
    seconds: float


def write_streamed(ckpt: Checkpoint, config, tokenizer, plan: Plan, expert: str | None, out: str | Path, *,
                   dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   progress: bool = True) -> StreamedWrite:
    """Write `ckpt` pruned to the plan's expert as a Hugging Face folder in `dtype` (default: the
    checkpoint's own), never holding more than one decoder layer."""
    t0 = time.time()
    dtype = dtype or ckpt.dtype
    stream = stream_pruned_tensors(ckpt, config, plan, expert, dtype, progress=progress, desc="slicing and saving")
    try:
        folder = write_pruned_folder(out, stream.layout, stream.specs, stream.tensors, tokenizer, dtype,
                                     max_shard_bytes)
    finally:
        stream.close()
    return StreamedWrite(folder, stream.layout, sum(s.nbytes for s in stream.specs), stream.max_resident_layers,
                         time.time() - t0)

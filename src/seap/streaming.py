"""Slicing and saving a checkpoint that is not in memory (DESIGN 2.9): layer by layer from its shards.

The pruned layout (config, every tensor's name and shape) comes from slicing an empty skeleton
with the plan; the values come from a second skeleton whose decoder layers are loaded one at a
time from the source shards, cut by the same `slice_layer` as the in-memory path, streamed to
the output shards and freed. Tensors outside the layers are copied as they are. The result equals,
tensor for tensor, what the in-memory path writes from the same checkpoint and plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_for_config
from .checkpoint import DEFAULT_SHARD_BYTES, Checkpoint
from .layerwise import SkeletonLoader, empty_model
from .plan import Plan
from .pruned import model_tensors, tensor_specs, write_pruned_folder
from .surgery import slice_layer, slice_model


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
    adapter = adapter_for_config(config)
    dtype = dtype or ckpt.dtype
    layout = empty_model(config, dtype)
    slice_model(layout, adapter, plan, expert, check=False)
    _, ex = plan.expert(expert)
    work = empty_model(config, dtype)
    loader = SkeletonLoader(work, adapter, ckpt)
    specs = tensor_specs(layout, dtype)
    prefix = loader.layer_prefix
    buffers = dict(model_tensors(work))
    bar = tqdm(total=len(loader.layers), desc="slicing and saving", unit="layer", disable=not progress)

    def values():
        current, params = None, {}
        for spec in specs:
            name = spec.name
            if name.startswith(prefix):
                i = int(name[len(prefix):].split(".", 1)[0])
                if i != current:
                    if current is not None:
                        loader.layers[current].to("meta")
                        bar.update()
                    loader.load(loader.layer_params(i), torch.device("cpu"), dtype)
                    slice_layer(loader.layers[i], adapter, ex, i, plan.head_unit)
                    params = {f"{prefix}{i}.{n}": p for n, p in loader.layers[i].named_parameters()}
                    current = i
                yield name, params[name].detach().to(spec.dtype)
            elif name in loader.names:
                yield name, ckpt.read([loader.names[name]])[loader.names[name]].to(spec.dtype)
            else:  # a persistent buffer the skeleton computed itself
                yield name, buffers[name].detach().to(spec.dtype)
        if current is not None:
            loader.layers[current].to("meta")
            bar.update()

    stream = values()
    try:
        folder = write_pruned_folder(out, layout, specs, stream, tokenizer, dtype, max_shard_bytes)
    finally:
        stream.close()
        bar.close()
    return StreamedWrite(folder, layout, sum(s.nbytes for s in specs), loader.resident_max, time.time() - t0)

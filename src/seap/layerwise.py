"""Layer-by-layer calibration (docs/design.md §2.9): statistics of a model that never fits in memory.

The model is built as an empty skeleton (`seap.skeleton`, accelerate's `init_empty_weights`). The embeddings are
loaded, every calibration batch runs through the body once with each decoder layer replaced by a
catcher that records what the layer receives (hidden states of layer 0; attention masks and
position embeddings of every layer: Gemma 3's differ between sliding and global layers), and the
embeddings are freed. Then, for each layer: its tensors are read from the checkpoint's shards onto
the compute device, every batch runs through it with the statistics hooks on, its outputs become
the next layer's inputs (on the device, or on the CPU when they do not fit), and the layer goes
back to the meta device. Peak memory: one layer, the embeddings (briefly), the hidden states.

A long run checkpoints (statistics of the finished layers + the hidden states after the last one)
whenever that costs under a tenth of the time since the previous checkpoint; a killed run started
again with the same settings resumes after the last checkpointed layer and ends with the same
statistics as an uninterrupted one (`seap.resume`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, adapter_for_config
from .checkpoint import Checkpoint
from .runtime import available_memory
from .stats import ActivationStats, ChannelStats, batches, capture_activations, finish_stats, position_limit
from .resume import RESUME_VERSION, Resume
from .skeleton import SkeletonLoader, empty_model
from .weights import CheckpointWeights, LayerWeights

log = logging.getLogger(__name__)


# -- catching each layer's inputs -------------------------------------------------------------------
class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer i: records its call and passes the hidden states through."""

    def __init__(self, original: nn.Module, i: int, calls: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: its meta weights stay out of sight
        self.i, self.calls, self.last = i, calls, last

    def __getattr__(self, name):  # e.g. `attention_type`, read by some model loops
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.i] = (hidden_states if self.i == 0 else None, args, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def catch_inputs(model: nn.Module, adapter: Adapter, enc: dict[str, torch.Tensor]) -> list[tuple]:
    """(hidden states of layer 0, args, kwargs of every layer) for one batch."""
    layers = adapter.layers(model)
    originals = list(layers)
    calls: list = [None] * len(layers)
    body = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(originals[i], i, calls, i == len(layers) - 1)
        try:
            body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        except _Stop:
            pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return calls


# -- a generic runner -----------------------------------------------------------------------------------------
class LayerRunner:
    """Calibration batches run through a model's decoder layers one at a time: the inputs of every
    layer are caught once, then `layers()` gives each layer (loaded from the checkpoint when `loader`
    is given, released after) and `run(i, layer)` its outputs on the current hidden states, which
    `advance` makes the next layer's inputs. Works on a model in memory and on an empty skeleton.
    `state["mask"]` and `state["batch"]` hold the real-token mask and index of the batch being run
    (for hooks)."""

    def __init__(self, model: nn.Module, adapter: Adapter, enc_batches: list[dict[str, torch.Tensor]], *,
                 device: torch.device, loader: SkeletonLoader | None = None, dtype: torch.dtype | None = None):
        self.model, self.adapter, self.loader, self.device, self.dtype = model, adapter, loader, device, dtype
        self._layers = adapter.layers(model)
        self.n_layers = len(self._layers)
        others = []
        if loader is not None:
            others = loader.other_params()
            loader.load(others, device, dtype)
            for name, buf in list(model.named_buffers()):
                if not name.startswith(loader.layer_prefix):
                    _set_buffer(model, name, buf.to(device))
        try:
            self.calls = [catch_inputs(model, adapter, _to(b, device)) for b in enc_batches]
        finally:
            if loader is not None:
                loader.release(others)
        self.masks = [b["attention_mask"].bool().to(device) for b in enc_batches]
        self.hidden = [c[0][0] for c in self.calls]
        for c in self.calls:
            c[0] = (None, c[0][1], c[0][2])
        self.n_tokens = int(sum(int(m.sum()) for m in self.masks))
        self.state: dict = {"mask": None, "batch": None}

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        for i, layer in enumerate(self._layers):
            names = self.loader.layer_params(i) if self.loader is not None else []
            if names:
                self.loader.load(names, self.device, self.dtype)
            try:
                yield i, layer
            finally:
                if names:
                    self.loader.release(names)

    def run(self, i: int, layer: nn.Module) -> list[torch.Tensor]:
        dev = next(layer.parameters()).device
        outs = []
        for b, h in enumerate(self.hidden):
            _, args, kwargs = self.calls[b][i]
            self.state["mask"], self.state["batch"] = self.masks[b], b
            out = layer(h.to(dev), *args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        self.state["mask"] = None
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


# -- the pass -----------------------------------------------------------------------------------------
@dataclass
class LayerwiseResult:
    stats: dict[str, ActivationStats]
    weights: CheckpointWeights
    max_resident_layers: int
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_after: int | None = None  # the last layer a resumed run did not recompute
    hidden_on: str = "device"


def run_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def layerwise_stats(ckpt: Checkpoint, config, tokenizer, corpora: dict[str, Sequence[str]], *, heads: bool = False,
                    batch_size: int = 8, max_length: int = 512, device: torch.device, dtype: torch.dtype,
                    metas: dict[str, dict] | None = None, resume_dir: str | Path | None = None,
                    checkpoint_overhead: float = 0.1, progress: bool = True) -> LayerwiseResult:
    """Activation statistics of each corpus, one decoder layer in memory at a time."""
    t0 = time.time()
    adapter = adapter_for_config(config)
    model = empty_model(config, dtype)
    loader = SkeletonLoader(model, adapter, ckpt)
    layers = loader.layers
    n_layers = len(layers)
    max_length = position_limit(config, max_length)
    enc = {t: batches(tokenizer, texts, batch_size, max_length) for t, texts in corpora.items()}
    key = run_key({"v": RESUME_VERSION, "ckpt": str(ckpt.folder.resolve()), "dtype": str(dtype),
                   "device": device.type, "heads": heads, "batch": batch_size, "max_length": max_length,
                   "texts": [[t, hashlib.sha256("\x00".join(v).encode()).hexdigest()] for t, v in corpora.items()],
                   "shapes": [list(ckpt.tensors[n].shape) for n in sorted(ckpt.tensors)[:8]]})
    resume = Resume(Path(resume_dir), key) if resume_dir is not None else None

    # Everything outside the decoder layers (embeddings, positions, rotary buffers) on the device.
    others = loader.other_params()
    loader.load(others, device, dtype)
    for name, buf in list(model.named_buffers()):
        if not name.startswith(loader.layer_prefix):
            _set_buffer(model, name, buf.to(device))
    calls = {t: [catch_inputs(model, adapter, _to(b, device)) for b in bs] for t, bs in enc.items()}
    loader.release(others)
    masks = {t: [b["attention_mask"].bool().to(device) for b in bs] for t, bs in enc.items()}
    hidden = {t: [c[0][0] for c in cs] for t, cs in calls.items()}
    for cs in calls.values():  # the hidden states live in `hidden` only, so they are freed as layers replace them
        for c in cs:
            c[0] = (None, c[0][1], c[0][2])
    hidden_bytes = sum(h.numel() * h.element_size() for hs in hidden.values() for h in hs)
    on_cpu = device.type != "cpu" and hidden_bytes * 3 > available_memory(device)
    if on_cpu:
        log.info("calibration hidden states (%.1f GB) stay on the CPU", hidden_bytes / 1e9)
        hidden = {t: [h.cpu() for h in hs] for t, hs in hidden.items()}

    ffn: dict[str, list[ChannelStats]] = {t: [] for t in corpora}
    attn: dict[str, list[ChannelStats]] = {t: [] for t in corpora}
    summaries: list[LayerWeights] = []
    start, resumed = 0, None
    if resume is not None and (state := resume.load(n_layers, list(corpora))) is not None:
        start, saved_hidden, per_layer = state
        resumed = start - 1
        for t in corpora:
            hidden[t] = [h.to(hidden[t][0].device) for h in saved_hidden[t]]
        for layer_stats in per_layer:
            for t in corpora:
                ffn[t].append(layer_stats["ffn"][t])
                if heads:
                    attn[t].append(layer_stats["attn"][t])
            summaries.append(layer_stats["weights"])
        log.info("resuming the layer-by-layer pass at layer %d of %d", start, n_layers)
    t_load = t_run = 0.0
    last_ckpt, ckpt_cost = time.time(), 0.0
    for i in tqdm(range(start, n_layers), desc="layer-by-layer statistics", unit="layer", disable=not progress,
                  initial=start, total=n_layers):
        ta = time.time()
        names = loader.layer_params(i)
        loader.load(names, device, dtype)
        layer = layers[i]
        tb = time.time()
        t_load += tb - ta
        done = {}
        for t in corpora:
            with capture_activations(model, adapter, heads, layers={i: layer}) as rec:
                for b, h in enumerate(hidden[t]):
                    _, args, kwargs = calls[t][b][i]
                    rec.token_mask = masks[t][b]
                    out = layer(h.to(device), *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    hidden[t][b] = out.cpu() if on_cpu else out
                f, a = rec.results()
            ffn[t].append(f[0])
            if heads:
                attn[t].append(a[0])
            done[t] = (f[0], a[0] if heads else None)
        summaries.append(LayerWeights.of_layer(layer, adapter))
        loader.release(names)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t_run += time.time() - tb
        if resume is not None:
            resume.save_layer(i, done, summaries[-1])
            since = time.time() - last_ckpt
            if i < n_layers - 1 and since >= ckpt_cost / max(checkpoint_overhead, 1e-6):
                tc = time.time()
                resume.save_hidden(i + 1, hidden)
                ckpt_cost, last_ckpt = time.time() - tc, time.time()
    stats = {}
    for t in corpora:
        meta = dict((metas or {}).get(t, {}))
        n_texts = sum(len(b["input_ids"]) for b in enc[t])
        stats[t] = finish_stats(ffn[t], attn[t] if heads else None, meta, n_texts=n_texts, max_length=max_length)
        stats[t].meta["pass"] = "layerwise"
    if resume is not None:
        resume.clear()
    weights = loader.weights(summaries, device, dtype)
    return LayerwiseResult(stats, weights, loader.resident_max,
                           {"statistics": round(time.time() - t0, 2), "layer_loads": round(t_load, 2),
                            "layer_compute": round(t_run, 2)}, resumed, "cpu" if on_cpu else "device")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _set_buffer(model: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner, _, name = dotted.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    persistent = name not in getattr(mod, "_non_persistent_buffers_set", set())
    mod.register_buffer(name, value, persistent=persistent)

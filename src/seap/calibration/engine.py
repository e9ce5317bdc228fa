"""One calibration engine (docs/design.md §2.10): every pass over calibration texts, layer by layer.

The engine owns the layer loop for a model in memory and for an empty skeleton streamed from its
checkpoint's shards alike. The inputs of every decoder layer are caught once (the "catcher" of
Wanda / FLAP: hidden states of layer 0, attention masks and position embeddings of every layer);
then each layer is loaded (streamed) or taken (in memory), every batch runs through it while the
observers record the inputs of its output linears, the caller decides from what they saw (widths,
channels, refits), and the layer's outputs, dense or pruned, become the next layer's inputs: on the
device, or on the CPU when they do not fit there. Around that loop the engine owns, for every pass:
forward hooks (seap.model.hooks, always removed), the sums across processes
under torch.distributed (seap.calibration.distributed), resume (seap.calibration.resume: each finished layer's record and
the next layer's inputs), and progress with an ETA.

The observers (seap.calibration.observers) get the inputs of a layer's output linears; a pass is
`run_pass(engine, observers, decide)`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import StoredTensor
from ..model.adapters import Adapter
from ..model.hooks import observing
from ..model.runtime import available_memory
from . import distributed as dist

log = logging.getLogger(__name__)

KINDS = ("ffn", "attn")  # the output linears whose inputs are observed: down_proj, o_proj


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


# -- the engine ---------------------------------------------------------------------------------------------
class Engine:
    """Calibration batches through a model's decoder layers one at a time.

    `batches` and their corpus `labels` are this process's share. With a `loader`
    (seap.model.skeleton.SkeletonLoader) the model is an empty skeleton whose layers are read from the
    checkpoint one at a time; without one it is a model in memory. `offload`: keep the hidden states on
    the CPU (None: when three copies of them would not fit in the device's free memory)."""

    def __init__(self, model: nn.Module, adapter: Adapter, batches: list[dict[str, torch.Tensor]],
                 labels: Sequence[str], *, device: torch.device, loader=None, dtype: torch.dtype | None = None,
                 offload: bool | None = None):
        self.model, self.adapter, self.loader, self.device, self.dtype = model, adapter, loader, device, dtype
        self.labels = list(labels)
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
            self.calls = [catch_inputs(model, adapter, {k: v.to(device) for k, v in b.items()}) for b in batches]
        finally:
            if loader is not None:
                loader.release(others)
        self.masks = [b["attention_mask"].bool().to(device) for b in batches]
        self.hidden = [c[0][0] for c in self.calls]
        for c in self.calls:  # the hidden states live in `hidden` only, freed as layers replace them
            c[0] = (None, c[0][1], c[0][2])
        self.tokens_by_label: dict[str, int] = {}
        for lab, m in zip(self.labels, self.masks):
            self.tokens_by_label[lab] = self.tokens_by_label.get(lab, 0) + int(m.sum())
        self.n_tokens = sum(self.tokens_by_label.values())
        hidden_bytes = sum(h.numel() * h.element_size() for h in self.hidden)
        self.offload = (device.type != "cpu" and hidden_bytes * 3 > available_memory(device)) if offload is None \
            else offload
        if self.offload:
            log.info("calibration hidden states (%.1f GB) stay on the CPU", hidden_bytes / 1e9)
            self.hidden = [h.cpu() for h in self.hidden]
        self.batch: int | None = None  # the batch being run (for observers)

    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer i, loaded from the checkpoint for the block's duration when streamed."""
        return _resident(self, i)

    def run(self, i: int, layer: nn.Module, sink: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Layer i's outputs on every batch's hidden states (on the CPU when offloaded)."""
        dev = next(layer.parameters()).device
        outs = []
        for b, h in enumerate(self.hidden):
            _, args, kwargs = self.calls[b][i]
            self.batch = b
            out = layer(h.to(dev), *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outs.append(out.cpu() if self.offload else out)
        self.batch = None
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


@contextmanager
def _resident(engine: Engine, i: int) -> Iterator[nn.Module]:
    names = engine.loader.layer_params(i) if engine.loader is not None else []
    if names:
        engine.loader.load(names, engine.device, engine.dtype)
    try:
        yield engine._layers[i]
    finally:
        if names:
            engine.loader.release(names)
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Tensors under
    glibc's mmap threshold (a layer's per-batch hidden states and activations) live on the heap, whose
    freed holes otherwise stay resident: a pass over many layers would grow its RSS layer by layer."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# -- a pass ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What the caller decided for layer i: its record (saved for resume, handed back on a resumed
    run) and, in a sequential pass, a context that makes the layer compute its pruned self so that
    the next layer sees it."""

    record: dict = field(default_factory=dict)
    pruned: Callable[[nn.Module], object] | None = None


@dataclass
class PassResult:
    records: list[dict | None]  # None: on disk in `resume` (a checkpointed pass holds no record in memory)
    seconds: dict[str, float]
    resumed_from: int | None  # the first layer this run computed when it resumed
    tokens: int  # calibration tokens of this process
    tokens_all: list[int]  # of every process
    resume: object | None = None

    def record(self, i: int) -> dict:
        rec = self.records[i]
        return rec if rec is not None else self.resume.record(i)

    def stored(self, i: int, key: str) -> torch.Tensor | StoredTensor:
        """Tensor `key` of layer i's record: in memory, or left unread in the checkpoint (valid until the
        checkpoint is removed)."""
        rec = self.records[i]
        return rec[key] if rec is not None else StoredTensor(self.resume.tensors_path(i), key)


def run_pass(engine: Engine, observers: Sequence, decide: Callable[[int, nn.Module, dict], Outcome], *,
             resume=None, skip_gram: Callable[[int], bool] | None = None, desc: str = "calibration",
             progress: bool = True, sequential: bool = False) -> PassResult:
    """Every decoder layer once: observe its output linears' inputs on all batches, reduce the
    observations across processes, `decide(i, layer, {observer name: result})`, advance the hidden
    states (the pruned layer's outputs when the outcome says so), checkpoint. `resume`: a
    seap.calibration.resume.Resume, which records every layer and hands back the records of the layers a killed
    run finished. `skip_gram(i)`: layer i needs no Gram matrix (kept dense). `sequential`: a decision may
    ask for the layer to be run again pruned, so its inputs stay alive through it; otherwise they are
    freed before the decision (the OBS choice's peak is the pass's peak)."""
    adapter = engine.adapter
    records: list[dict] = []
    start = 0
    if resume is not None and (state := resume.load(engine.n_layers)) is not None:
        start, hidden = state
        records = [None] * start
        engine.advance([h.to(engine.hidden[0].device) for h in hidden])
        if start < engine.n_layers:
            dist.log_once(f"resuming the {desc} pass at layer {start} of {engine.n_layers} "
                          f"(layers 0-{start - 1} were finished by an earlier run)")
        else:
            dist.log_once(f"resuming after the {desc} pass: an earlier run finished all {start} layers, "
                          "whose records are reused")
    t = {"layer_loads": 0.0, "forward": 0.0, "decide": 0.0, "checkpoint": 0.0}
    bar = tqdm(range(start, engine.n_layers), desc=desc, unit="layer", initial=start, total=engine.n_layers,
               disable=not progress or not dist.is_main())
    for i in bar:
        t0 = time.time()
        with engine.layer(i) as layer:
            t1 = time.time()
            linears = {"ffn": adapter.ffn_out(layer)}
            if any("attn" in getattr(o, "kinds", ()) for o in observers):
                linears["attn"] = adapter.attn_out(layer)
            skip = skip_gram(i) if skip_gram is not None else False
            for o in observers:
                o.start(linears, skip)

            def sink(kind: str, x: torch.Tensor) -> None:
                b = engine.batch
                x, mask = x.reshape(-1, x.shape[-1]), engine.masks[b].reshape(-1)
                if x.device.type == "cpu":  # the padding dropped once for every observer (a GPU masks: no sync)
                    x, mask = x[mask.to(x.device)], None
                for o in observers:
                    o.add(kind, x, mask, engine.labels[b])

            with observing(linears, sink):
                outputs = engine.run(i, layer)
            for o in observers:
                if hasattr(o, "outputs"):
                    o.outputs(i, outputs, engine.masks)
            if not sequential:
                engine.advance(outputs)
                del outputs
                release_freed_memory()  # the inputs, before the decision's workspace is allocated
            t2 = time.time()
            outcome = decide(i, layer, {o.name: o.result() for o in observers})
            t3 = time.time()
            if outcome.pruned is not None:  # sequential: the next layer sees this one pruned
                if not sequential:
                    raise RuntimeError("a decision asked for a pruned re-run in a pass not opened as sequential")
                del outputs
                with outcome.pruned(layer):
                    outputs = engine.run(i, layer)
            t4 = time.time()
        if sequential:
            engine.advance(outputs)
        release_freed_memory()
        if resume is not None:
            resume.save_layer(i, outcome.record, engine.hidden, last=i == engine.n_layers - 1)
        records.append(None if resume is not None else outcome.record)
        t5 = time.time()
        for k, v in (("layer_loads", t1 - t0), ("forward", t2 - t1 + t4 - t3), ("decide", t3 - t2),
                     ("checkpoint", t5 - t4)):
            t[k] += v
    bar.close()
    return PassResult(records, {k: round(v, 2) for k, v in t.items()}, start if start else None,
                      engine.n_tokens, dist.gather_ints(engine.n_tokens), resume)


def _set_buffer(model: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner, _, name = dotted.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    persistent = name not in getattr(mod, "_non_persistent_buffers_set", set())
    mod.register_buffer(name, value, persistent=persistent)

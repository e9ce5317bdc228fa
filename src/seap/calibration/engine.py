"""One calibration engine (docs/design.md §2.10): every pass over calibration texts, layer by layer.

The engine owns the layer loop for a model in memory and for an empty skeleton streamed from its
checkpoint's shards alike. The inputs of every decoder layer are caught once (the "catcher" of
Wanda / FLAP: hidden states of layer 0, attention masks and position embeddings of every layer);
then each layer is loaded (streamed) or taken (in memory), every batch runs through it while the
observers record the inputs of its output linears, the caller decides from what they saw (widths,
channels, refits), and the layer's outputs, dense or pruned, become the next layer's inputs: on the
device, or on the CPU when they do not fit there. Around that loop the engine owns, for every pass:
the one helper that registers forward hooks (and always removes them), the sums across processes
under torch.distributed (seap.calibration.distributed), resume (seap.calibration.resume: each finished layer's record and
the next layer's inputs), and progress with an ETA.

Observers: `StatsObserver` (activation statistics per corpus, §2.1), `GramObserver` (first and
second moments per group of corpora, §2.8), `PriorObserver` (GRIFFIN's generic prior, §2.6) and
`PooledOutputs` (each text's pooled layer outputs: the hidden-state probe of `seap analyze clusters`).
An observer gets the inputs of a layer's output linears (`add`); one with an `outputs` method also
gets the layer's outputs on every batch. A pass is `run_pass(engine, observers, decide)`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import StoredTensor
from ..core.reconstruct import Moments
from ..core.scores import squared_neuron_scores
from ..model.adapters import Adapter
from ..model.runtime import available_memory
from . import distributed as dist
from .gram import GramAccumulator
from .stats import ChannelStats, DeviceStats

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


# -- the one hook helper ------------------------------------------------------------------------------------
@contextmanager
def observing(modules: Mapping, sink: Callable[[object, object], None], *, output: bool = False,
              whole: bool = False) -> Iterator[None]:
    """Forward hooks on `modules` (name -> module): `sink(name, x)` gets each call's first input (a
    pre-hook), or its output with `output` (the first element of a tuple, or exactly what the module
    returned with `whole`). Every hook is removed when the block exits, whatever happens inside it.
    The one place in seap's calibration and analysis that registers hooks."""
    handles = []

    def pre(name):
        return lambda _m, args: sink(name, args[0])

    def post(name):
        return lambda _m, _args, out: sink(name, out[0] if isinstance(out, tuple) and not whole else out)

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(post(name)) if output
                           else mod.register_forward_pre_hook(pre(name)))
        yield
    finally:
        for h in handles:
            h.remove()


# -- observers ----------------------------------------------------------------------------------------------
class StatsObserver:
    """Activation statistics (count, mean, M2, sum of squares) of the FFN output linear's input (and the
    attention output's with `heads`), one set per corpus label."""

    name = "stats"

    def __init__(self, labels: Sequence[str], heads: bool):
        self.labels, self.kinds = sorted(set(labels)), ("ffn", "attn") if heads else ("ffn",)
        self.acc: dict[str, dict[str, DeviceStats]] = {}

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        self.acc = {lab: {k: DeviceStats(linears[k].in_features, linears[k].weight.device) for k in self.kinds}
                    for lab in self.labels}

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        if kind in self.kinds:
            self.acc[label][kind].add(x.reshape(-1, x.shape[-1]), mask)

    def result(self) -> dict[str, dict[str, ChannelStats]]:
        """label -> kind -> statistics summed over every process's share of the texts."""
        return {lab: {k: dist.merge_channel_stats(a.result()) for k, a in kinds.items()}
                for lab, kinds in self.acc.items()}


class GramObserver:
    """The moments (count, sum, Gram matrix) of the output linears' inputs for each group of corpus labels
    (an expert's corpora): one Gram matrix per group and kind, accumulated only for the layers the
    caller marks as needing one (a layer kept dense needs no refit)."""

    name = "gram"

    def __init__(self, groups: Mapping[str, Sequence[str]], kinds: Sequence[str]):
        self.groups, self.kinds = {g: set(ls) for g, ls in groups.items()}, tuple(kinds)
        self.acc: dict[str, dict[str, GramAccumulator]] = {}

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        self.acc = {} if skip else {g: {k: GramAccumulator(linears[k].in_features, linears[k].weight.device)
                                        for k in self.kinds} for g in self.groups}

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        for g, labels in self.groups.items():
            if label in labels and kind in self.kinds and g in self.acc:
                self.acc[g][kind].add(x, mask)

    def result(self) -> dict[str, dict[str, Moments]]:
        out = {}
        for g, kinds in self.acc.items():
            out[g] = {}
            for k, a in kinds.items():
                a.flush()  # the float32 partial belongs to this process's sum: merge it before the all-reduce
                dist.all_reduce_sum(a.count, a.total, a.gram)
                out[g][k] = a.result()
        self.acc = {}  # the Gram matrices live only as long as the caller's decision needs them
        return out


class PriorObserver:
    """GRIFFIN's corpus statistic (seap.inference.griffin.corpus_statistic) of each layer: the sum over real tokens
    of z_tj^2 / ||z_t||^2 for the FFN output linear's input z, summed across processes."""

    name = "prior"
    kinds = ("ffn",)

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def start(self, linears: Mapping[str, nn.Module], skip: bool) -> None:
        self.total = torch.zeros(linears["ffn"].in_features, dtype=torch.float64, device=linears["ffn"].weight.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.total.device)

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        if kind != "ffn":
            return
        self.total += squared_neuron_scores(x[None], None if mask is None else mask[None])[0].double()
        self.count += x.shape[0] if mask is None else mask.sum(dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, int]:
        """(the layer's sum, the real tokens it is over), over every process."""
        dist.all_reduce_sum(self.total, self.count)
        return self.total, int(self.count)


class PooledOutputs:
    """Every layer's outputs pooled per text over its real tokens (the mean, or the last token):
    [n_layers, n_texts, hidden] float32. `rows[b]`: the texts of batch b (stats.indexed_batches)."""

    name = "pooled"

    def __init__(self, n_layers: int, rows: Sequence[Sequence[int]], hidden: int, pool: str = "mean"):
        self.rows = [torch.as_tensor(r, dtype=torch.int64) for r in rows]
        self.pool = pool
        self.pooled = torch.zeros(n_layers, sum(len(r) for r in rows), hidden)

    def start(self, linears: Mapping[str, nn.Linear], skip: bool) -> None:
        pass

    def add(self, kind: str, x: torch.Tensor, mask: torch.Tensor | None, label: str) -> None:
        pass

    def outputs(self, i: int, outputs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        for rows, h, m in zip(self.rows, outputs, masks):
            m = m.to(h.device, h.dtype)  # [B, S]
            if self.pool == "mean":
                v = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            else:  # the last real token, wherever the padding is
                last = (m * torch.arange(m.shape[1], dtype=m.dtype, device=m.device)).argmax(1)
                v = h[torch.arange(h.shape[0], device=h.device), last]
            self.pooled[i, rows] = v.float().cpu()

    def result(self) -> torch.Tensor:
        return self.pooled


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

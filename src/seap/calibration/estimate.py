"""What a calibration pass will cost, from the geometry, the token count and the device, before it runs.

Time: floating-point work per stage divided by rates measured on the device in a fraction of a second
(a float32 and a float64 matrix product), with the constants of seap's own kernels (the OBS choice
counts as about 2.4 C^3 float32 operations for a layer of C channels, factor, inverse and updates of
the lower triangle together: measured 33 s a layer in the 8B-geometry default prune on 2 CPU cores
whose matrix product runs at about 178 GFLOPS). Memory: the largest of
what is alive at once (the resident layer, the calibration hidden states, the Gram matrices and the
OBS or refit workspace of one layer; see seap.core.reconstruct), so a run that cannot fit is refused up
front with what to change, not killed an hour in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..model.runtime import available_memory, fmt_bytes

OBS_WORK = 2.4  # float32 operations of the OBS choice per C^3 (factor, inverse, greedy updates), as timed at 8B
GATHER_EFFICIENCY = 0.7  # the refit and the errors gather blocks of the float64 Gram matrix: below the matmul rate
FORWARD_EFFICIENCY = 0.7  # a decoder layer's forward against a square matrix product (measured at 8B on a CPU)
_RATES: dict[tuple[str, torch.dtype], float] = {}


def measured_rate(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 6) -> float:
    """Floating-point operations per second of an n x n matrix product on `device` (the best of a few
    runs, so a moment's contention does not inflate the estimate; cached)."""
    key = (str(device), dtype)
    if key not in _RATES:
        a = torch.randn(n, n, device=device).to(dtype)
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _RATES[key] = 2 * n ** 3 / max(best, 1e-9)
    return _RATES[key]


@dataclass
class Estimate:
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> estimated seconds
    peak: dict[str, int] = field(default_factory=dict)  # what is alive at the peak -> bytes
    free: int = 0  # what the peak may use: memory available now, plus the part of the peak already resident
    resident: int = 0  # of the peak, already allocated when the estimate is made (a model loaded whole)

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak.values())

    def line(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {_fmt_s(v)}" for k, v in self.seconds.items() if v >= 0.5)
        mem = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.peak.items() if v)
        return (f"estimated {_fmt_s(total)} ({parts}); peak memory about {fmt_bytes(self.peak_bytes)} ({mem}) "
                f"of {fmt_bytes(self.free)} free{' counting the loaded model' if self.resident else ''}")


def _fmt_s(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def calibration_estimate(*, layers: list[dict], hidden: int, vocab: int, tokens: int, padded_tokens: int,
                         batch_tokens: int, param_bytes: int, streamed: bool, groups: int, obs: bool,
                         refit: bool, device: torch.device, sequential: bool = False, store_bytes: int = 2,
                         checkpointed: bool = True) -> Estimate:
    """`layers`: per decoder layer {params, d_ff, kept, dense}; `tokens`: real calibration tokens of this
    process, `padded_tokens` with padding, `batch_tokens` of the largest batch; `param_bytes`: bytes per
    parameter in the compute dtype; `groups`: Gram matrices per layer (experts refitted in the pass);
    `sequential`: the layer's inputs stay alive through its decision (seap.calibration.engine.run_pass);
    `store_bytes`: per parameter of the refitted weights (the save dtype): a `checkpointed` pass leaves
    them in its records on disk and the save reads one layer's at a time; otherwise they are all held
    from the start."""
    r32, r64 = measured_rate(device, torch.float32), measured_rate(device, torch.float64)
    est = Estimate(free=available_memory(device))
    fwd = gram = choice = fit = err = 0.0
    work = gram_bytes = held = held_layer = 0
    for lay in layers:
        c, k, d = lay["d_ff"], lay["kept"], hidden
        fwd += 2 * lay["params"] * padded_tokens / r32 / FORWARD_EFFICIENCY
        if refit:  # every layer's refitted output weights (an identity copy in a dense layer), per expert
            weights = groups * d * (c if lay["dense"] else k) * store_bytes
            held, held_layer = held + weights, max(held_layer, weights)
        if not refit or lay["dense"]:
            continue
        gram += groups * padded_tokens * c * c / r32  # the lower triangle of z^T z
        if obs:
            choice += groups * OBS_WORK * c ** 3 / r32
        r = c - k
        fit += groups * (k ** 3 / 3 + 2 * k * k * d + 2 * k * r * d) / r64 / GATHER_EFFICIENCY
        err += groups * d * r * r / r32 / GATHER_EFFICIENCY  # one cut of the kept channels, lower blocks
        # per group a float64 Gram matrix; then the OBS choice's two float32 C x C (or the refit's S_KK and its
        # factor), W^T and the refit's float64 pieces of W
        work = max(work, 8 * c * c * groups + max(8 * c * c if obs else 0, 16 * k * k) + 12 * d * c)
        gram_bytes = max(gram_bytes, 8 * c * c * groups + 4 * c * c)  # the float64 sums and one float32 partial
    est.seconds = {"forward": fwd, "Gram matrices": gram, "OBS choice": choice, "refit": fit, "errors": err}
    widest = max(lay["params"] for lay in layers)
    d_ff = max(lay["d_ff"] for lay in layers)
    hidden_states, runtime = 2 * padded_tokens * hidden * 4, 400 << 20  # in and out; torch and the tokenizer
    layer = {"layer" if streamed else "model": (widest if streamed else sum(lay["params"] for lay in layers)
                                                 + vocab * hidden) * param_bytes}
    # while the batches run: inputs, outputs, activations and the Gram sums; while the layer is decided:
    # its outputs (and inputs, in a sequential pass) and the choice's or refit's workspace
    during = {} if checkpointed else {"refitted weights": held}
    running = {**layer, "hidden states": hidden_states, "activations": 4 * batch_tokens * d_ff * 4,
               "Gram matrices": gram_bytes, **during, "runtime": runtime}
    workspace = "Gram and OBS workspace" if obs else "Gram and refit workspace"
    deciding = {**layer, "hidden states": hidden_states // (1 if sequential else 2), workspace: work,
                **during, "runtime": runtime}
    # after the pass the model is sliced and saved layer by layer, each with its refitted weights
    saving = {**layer, "refitted weights": held_layer if checkpointed else held, "runtime": runtime}
    per_layer = max(running, deciding, saving, key=lambda p: sum(p.values()))
    catch = {"embeddings": vocab * hidden * param_bytes, "hidden states": hidden_states, "runtime": runtime}
    est.peak = catch if streamed and sum(catch.values()) > sum(per_layer.values()) else per_layer
    if not streamed:  # the model is in memory already: available memory does not include it
        est.resident = layer["model"]
        est.free += est.resident
    return est


def model_estimate(adapter, model, enc: list[dict], kept: list[int], dense: list[bool], *, groups: int, obs: bool,
                   sequential: bool, streamed: bool, dtype: torch.dtype, device: torch.device,
                   store_dtype: torch.dtype = torch.bfloat16, checkpointed: bool = True) -> Estimate:
    """calibration_estimate of a model (real, or a skeleton on the meta device: only shapes are read) over
    the encoded calibration batches `enc`, with `kept` FFN channels per layer."""
    layers = [{"params": sum(p.numel() for p in layer.parameters()), "d_ff": adapter.d_ff(layer), "kept": kept[i],
               "dense": dense[i]} for i, layer in enumerate(adapter.layers(model))]
    emb = adapter.embeddings(model).weight
    return calibration_estimate(
        layers=layers, hidden=emb.shape[1], vocab=emb.shape[0],
        tokens=sum(int(b["attention_mask"].sum()) for b in enc), padded_tokens=sum(b["input_ids"].numel() for b in enc),
        batch_tokens=max(b["input_ids"].numel() for b in enc), param_bytes=torch.empty((), dtype=dtype).element_size(),
        streamed=streamed, groups=groups, obs=obs, refit=groups > 0, device=device, sequential=sequential,
        store_bytes=torch.empty((), dtype=store_dtype).element_size(), checkpointed=checkpointed)

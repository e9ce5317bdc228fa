"""Data-parallel calibration on torch.distributed (docs/design.md §2.10).

Under `torchrun --nproc-per-node N -m seap prune ...` every process runs its share of the calibration
texts through the resident layer; before each layer's decision the sums (token counts, first and
second moments, Gram matrices) are all-reduced, and activation statistics are gathered and merged in
rank order (Chan's formula), so every process takes the same decision and rank 0 writes the
artifacts. gloo on CPUs, NCCL on GPUs. Without torchrun (WORLD_SIZE unset or 1) every function here
is the identity and nothing is initialised.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Sequence, TypeVar

import torch
import torch.distributed as tdist

from ..errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number: start with torchrun") from None


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op for one process or when already joined)."""
    if tdist.is_initialized() or env_world_size() <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def share(items: Sequence[T]) -> list[T]:
    """This process's share of `items` (every world_size-th from its rank): the same texts whatever the
    order the processes start in."""
    return list(items[rank()::world_size()])


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes, in place."""
    if active():
        for t in tensors:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


def merge_channel_stats(stats):
    """Every process's ChannelStats merged in rank order (the same result on each)."""
    if not active():
        return stats
    packed = torch.stack([torch.full_like(stats.mean, float(stats.count)), stats.mean, stats.m2, stats.sumsq])
    parts = [torch.empty_like(packed) for _ in range(world_size())]
    tdist.all_gather(parts, packed.contiguous())
    merged = None
    for p in parts:
        cs = type(stats)(int(round(float(p[0, 0]))) if p.shape[1] else 0, p[1].clone(), p[2].clone(), p[3].clone())
        merged = cs if merged is None else merged.merge(cs)
    return merged


def gather_ints(n: int) -> list[int]:
    if not active():
        return [n]
    out = [None] * world_size()
    tdist.all_gather_object(out, int(n))
    return [int(x) for x in out]


def agree(value, what: str) -> None:
    """Refuse to go on when the processes disagree on `value` (e.g. their settings)."""
    if not active():
        return
    out = [None] * world_size()
    tdist.all_gather_object(out, value)
    if any(v != out[0] for v in out):
        raise ConfigError(f"the {world_size()} processes disagree on {what}: start them all with the same command")


def from_main(value: T) -> T:
    """Rank 0's value on every process (for decisions that must agree, e.g. when to checkpoint)."""
    if not active():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        tdist.barrier()


def log_once(message: str) -> None:
    """A line for the user, from rank 0 only (on stderr, whatever the logging level)."""
    if is_main():
        print(f"seap: {message}", file=sys.stderr, flush=True)

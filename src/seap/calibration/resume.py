"""Checkpoint and resume of a calibration pass (docs/design.md §2.10).

A pass records every finished layer (its statistics, weight summary and decisions: one safetensors
file of tensors plus a JSON file of the rest, written atomically) and, whenever that costs under a
tenth of the time since the previous one, the hidden states the next layer reads. A killed run
started again with the same settings resumes after the last layer whose outputs were saved and ends
equal to an uninterrupted run. The settings (model, corpus, dtype, device, ratio, reconstruction,
world size, ...) are stored with the checkpoint: a run with other settings is refused with the
settings that differ, rather than silently starting over or mixing two runs. Under torchrun, rank 0
writes the records (the same on every process) and each process its own hidden states.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .._io import save_tensors, write_error, write_json
from ..errors import ConfigError
from . import distributed as dist

log = logging.getLogger(__name__)

RESUME_VERSION = 2
# Hidden states are checkpointed when that costs under this share of the time since the previous save
# (every layer on a CPU, every few on a GPU, where a layer takes seconds).
CHECKPOINT_OVERHEAD = 0.1
Record = dict  # str -> torch.Tensor, or a JSON value


class Resume:
    """The checkpoint folder of one pass (`folder`/.calibration-<what>) under the given settings."""

    def __init__(self, folder: str | Path, what: str, settings: dict, *, overhead: float | None = None):
        self.folder = Path(folder) / f".calibration-{what}"
        self.settings = json.loads(json.dumps({"version": RESUME_VERSION, **settings}, default=str))
        self.overhead = CHECKPOINT_OVERHEAD if overhead is None else overhead
        self._last, self._cost = time.time(), 0.0

    @property
    def _rank_dir(self) -> Path:
        return self.folder / f"rank-{dist.rank()}"

    def save_layer(self, i: int, record: Record, hidden: list[torch.Tensor], *, last: bool) -> None:
        """Layer i's record; then, by the time policy, the hidden states that layer i+1 reads. A failed
        write (a full disk) is one line; the layers saved before it stay for a resume."""
        try:
            self._save_layer(i, record, hidden, last=last)
        except OSError as err:
            raise write_error(self.folder, err) from None

    def _save_layer(self, i: int, record: Record, hidden: list[torch.Tensor], *, last: bool) -> None:
        if dist.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in record.items() if isinstance(v, torch.Tensor)}
            rest = {k: v for k, v in record.items() if not isinstance(v, torch.Tensor)}
            save_tensors(self.tensors_path(i), tensors)
            write_json(self.folder / f"layer-{i:05d}.json", rest)
        if last:  # the pass is finished: a run stopped after it (in the save, say) reuses every record
            dist.barrier()
            if dist.is_main():
                write_json(self.folder / "state.json", {"settings": self.settings, "next_layer": i + 1})
            return
        if dist.from_main(time.time() - self._last < self._cost / max(self.overhead, 1e-6)):
            return
        t0 = time.time()
        self._rank_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self._rank_dir / "hidden.safetensors", {str(b): h.detach().cpu().contiguous()
                                                              for b, h in enumerate(hidden)})
        dist.barrier()  # every process's hidden states are saved before the state says so
        if dist.is_main():
            write_json(self.folder / "state.json", {"settings": self.settings, "next_layer": i + 1})
        self._cost, self._last = time.time() - t0, time.time()

    def check(self) -> None:
        """Refuse a checkpoint left by a run with other settings (one line, with what differs)."""
        path = self.folder / "state.json"
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError):
            return  # unreadable: load() starts over
        if saved != self.settings:
            diff = [f"{k}: {saved.get(k)!r} then, {self.settings.get(k)!r} now"
                    for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
            raise ConfigError(f"{self.folder} holds a killed run with other settings ({'; '.join(diff[:4])}): run "
                              f"the same command to resume it, or delete that folder to start over")

    def load(self, n_layers: int) -> tuple[int, list[torch.Tensor]] | None:
        """(first layer to compute, its input hidden states) or None; the records of the layers before it
        are read with `record(i)`. A finished pass gives (n_layers, [])."""
        self.check()
        path = self.folder / "state.json"
        if not path.is_file():
            return None
        try:
            start = int(json.loads(path.read_text())["next_layer"])
            if not 0 < start <= n_layers:
                return None
            hidden = []  # a finished pass needs no hidden states
            if start < n_layers:
                raw = load_file(str(self._rank_dir / "hidden.safetensors"))
                hidden = [raw[str(b)] for b in range(len(raw))]
            missing = [i for i in range(start) for ext in ("safetensors", "json")
                       if not (self.folder / f"layer-{i:05d}.{ext}").is_file()]
            if missing:
                raise OSError(f"the record of layer {missing[0]} is missing")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            log.warning("could not resume from %s (%s): starting over", self.folder, err)
            return None
        return start, hidden

    def record(self, i: int) -> Record:
        out: Record = dict(load_file(str(self.tensors_path(i))))
        out.update(json.loads((self.folder / f"layer-{i:05d}.json").read_text()))
        return out

    def tensors_path(self, i: int) -> Path:
        """The safetensors file of layer i's record."""
        return self.folder / f"layer-{i:05d}.safetensors"

    def clear(self) -> None:
        dist.barrier()
        self.remove()

    def remove(self) -> None:
        """Delete the checkpoint (rank 0), with no barrier: for after every process is done reading it."""
        if dist.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)

"""Safetensors checkpoints read and written one tensor at a time (docs/design.md §2.9, §3).

`Checkpoint` indexes a folder's shards (`model.safetensors` or `model-0000k-of-0000N.safetensors`
with `model.safetensors.index.json`), checks that every shard named is there and whole, and reads
only the tensors asked for, opening a shard, copying them out and closing it again, so that memory
holds what the caller keeps and nothing of the file mapping.

`ShardWriter` writes sharded safetensors as transformers lays them out, streaming: the headers are
computed up front from the tensors' shapes and dtypes, and each tensor's bytes go to disk as soon
as it is produced. Memory is one tensor, whatever the shard size or the model. (The safetensors
package writes a whole shard from memory at once, which is what this avoids.)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .._io import MANIFEST, write_error
from ..errors import ModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9  # the hub's usual shard size

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_FROM_ST.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes start in the file

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A local folder of safetensors weights, validated and read lazily."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise ModelError(f"{index} is corrupt ({err}): {redo_hint(folder)}") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise ModelError(f"{folder} has no safetensors weights (no {SINGLE_NAME} or {INDEX_NAME}): convert "
                                 "them with transformers' save_pretrained, or use --load whole")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelError(f"checkpoint {folder} is missing shard {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + f", named in {INDEX_NAME}: {redo_hint(folder)}")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            try:
                with safe_open(str(folder / f), framework="pt"):
                    pass  # the package's own checks: a header that parses, data that covers every tensor
                for name, (dtype, shape, offset) in _read_header(folder / f).items():
                    tensors[name] = TensorInfo(name, f, dtype, shape, offset)
            except (SafetensorError, OSError, ValueError, KeyError) as err:
                raise ModelError(f"shard {folder / f} is truncated or corrupt ({str(err).splitlines()[0][:90]}): "
                                 f"{redo_hint(folder)}") from None
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file != f]
            if absent:
                raise ModelError(f"checkpoint {folder}: tensor {absent[0]} is named in {INDEX_NAME} but not in "
                                 f"{weight_map[absent[0]]}: {redo_hint(folder)}")
        return cls(folder, tensors)

    # -- description -------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype that holds most of the weights' bytes (bfloat16 for most 7B+ checkpoints)."""
        by = Counter()
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] += t.nbytes
        return by.most_common(1)[0][0] if by else torch.float32

    # -- reading -----------------------------------------------------------------------------
    def read(self, names: Iterable[str], *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Copies of the named tensors, read with plain file reads (each shard opened once): no memory
        map, so the pages of a multi-GB shard never count as this process's memory."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise ModelError(f"checkpoint {self.folder} has no tensor {n!r}: is it the model its config.json "
                                 "describes?")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, group in by_file.items():
            try:
                with open(self.folder / f, "rb") as fh:
                    for n in group:
                        info = self.tensors[n]
                        raw = torch.empty(info.nbytes, dtype=torch.uint8)
                        fh.seek(info.offset)
                        if info.nbytes and fh.readinto(raw.numpy()) != info.nbytes:
                            raise OSError(f"{n} ends past the end of the file")
                        t = raw.view(info.dtype).reshape(info.shape)
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        out[n] = t.to(device) if device is not None else t
            except OSError as err:
                raise ModelError(f"reading {self.folder / f} failed ({str(err).splitlines()[0][:90]}): the shard "
                                 f"is damaged; {redo_hint(self.folder)}") from None
        return out

    def read_elements(self, name: str, positions: Sequence[int]) -> list[float]:
        """Single elements of a tensor at flat positions, without reading the tensor."""
        info = self.tensors[name]
        size = torch.empty((), dtype=info.dtype).element_size()
        raw = torch.empty(len(positions) * size, dtype=torch.uint8)
        with open(self.folder / info.file, "rb") as fh:
            for k, p in enumerate(positions):
                fh.seek(info.offset + p * size)
                raw[k * size:(k + 1) * size] = torch.frombuffer(bytearray(fh.read(size)), dtype=torch.uint8)
        return raw.view(info.dtype).float().tolist()


def redo_hint(folder: Path) -> str:
    """How to get a whole copy of `folder` back: seap wrote it (run that command again; its manifest or
    its seap_pruning record says so) or it came from elsewhere (download it again)."""
    for f in (folder, folder.parent):
        try:
            command = json.loads((f / MANIFEST).read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            command = None
        if command:
            return f"run `{command}` again"
    try:
        if "seap_pruning" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            return "seap wrote this folder: run `seap prune` (or `seap apply`) again"
    except (OSError, ValueError, TypeError):
        pass
    return "download the checkpoint again"


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """dtype, shape and absolute data offset of every tensor in a safetensors file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    start = 8 + n
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if v["dtype"] not in _FROM_ST:
            raise ValueError(f"tensor {name} has dtype {v['dtype']}, which seap does not read")
        out[name] = (_FROM_ST[v["dtype"]], tuple(v["shape"]), start + int(v["data_offsets"][0]))
    return out


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def shard_specs(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_bytes (a bigger tensor gets a shard of its own), as transformers."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(group: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in group:
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors package writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write `specs` (in this order) to `folder` as sharded safetensors; call `write` once per tensor."""

    def __init__(self, folder: str | Path, specs: Sequence[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError("shard size must be positive")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        self.folder = Path(folder)
        self.shards = shard_specs(list(specs), max_shard_bytes)
        n = len(self.shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(k, s) for k, group in enumerate(self.shards) for s in group]
        self._next = 0
        self._fh = None
        self._shard = -1

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for group in self.shards for s in group)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"unexpected tensor {name}: every tensor was written")
        k, spec = self._queue[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the expected "
                             f"{spec.name} {spec.shape} {spec.dtype}")
        if k != self._shard:
            self._open(k)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._fh.write(data.view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != k:
            self._close()

    def _open(self, k: int) -> None:
        self._close()
        self._fh = open(self.folder / self.files[k], "wb")
        self._fh.write(_header(self.shards[k]))
        self._shard = k

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def finish(self) -> list[str]:
        """Check that every tensor came, write the index (several shards); returns the files written."""
        self._close()
        if self._next != len(self._queue):
            raise ValueError(f"{len(self._queue) - self._next} tensors were never written, the first "
                             f"{self._queue[self._next][1].name}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {s.name: self.files[k] for k, group in enumerate(self.shards) for s in group}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return [*self.files, INDEX_NAME]
        return list(self.files)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_tensors(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], specs: Sequence[TensorSpec],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, *, target: str | Path | None = None) -> list[str]:
    """Stream (name, tensor) pairs, in the order of `specs`, into sharded safetensors in `folder`.

    A full disk becomes an ArtifactError that says so, naming `target` (the folder `folder` is the
    temporary of); the caller's atomic folder then vanishes."""
    writer = ShardWriter(folder, specs, max_shard_bytes)
    try:
        for name, t in tensors:
            writer.write(name, t)
        return writer.finish()
    except OSError as err:
        writer.abort()
        raise write_error(target or folder, err, sum(s.nbytes for s in specs)) from None
    except BaseException:
        writer.abort()
        raise


def parse_size(text: str | int, what: str = "`shard_size`") -> int:
    """'5GB', '500MB', '2GiB' or a byte count (`what` names it in errors: the CLI shows a flag)."""
    from ..errors import ConfigError

    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    value, mult = None, 1
    for u, m in units.items():
        if s.endswith(u):
            try:
                value, mult = float(s[: -len(u)]), m
            except ValueError:
                pass
            break
    if value is None:
        try:
            value = float(int(s))
        except ValueError:
            raise ConfigError(f"cannot read {what} {text!r}: give e.g. 5GB, 500MB or a byte count") from None
    if not value * mult >= 1 or value != value or value == float("inf"):  # zero, negative, below a byte, nan, inf
        raise ConfigError(f"{what} must be at least one byte, got {text!r}: give e.g. 5GB, 500MB or a byte count")
    return int(value * mult)

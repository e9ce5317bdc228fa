"""Atomic file writes: a temp file in the same folder, fsync, then rename.

An interrupted run never leaves a half-written artifact under the final name. What a killed run
does leave (its `.<name>.<random>.tmp` files and folders, a `.<name>.old` folder caught mid-swap)
is recognised by `is_temporary` and removed by `sweep_temporaries` on the next run into the folder.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError

log = logging.getLogger(__name__)

# the file that commits a seap output folder (seap.outputs writes and checks it)
MANIFEST = "seap-manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts should read like normal files
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class StoredTensor:
    """One tensor of a safetensors file, read when it is used: the refitted weights of a big model stay
    on disk (in the calibration checkpoint, or the saved plan) instead of all in memory at once."""

    __slots__ = ("path", "key")

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self):
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(self.key)

    def spec(self) -> tuple[str, list[int]]:
        """(safetensors dtype, shape), from the file's header alone."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            sl = f.get_slice(self.key)
            return sl.get_dtype(), list(sl.get_shape())


class TensorList(Sequence):
    """A per-layer list of tensors, each held in memory or on disk (StoredTensor); indexing gives the
    tensor, read then, so a loop over the layers holds one layer's at a time."""

    def __init__(self, items: Sequence):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        return item.load() if isinstance(item, StoredTensor) else item

    def __setitem__(self, i: int, value) -> None:
        self.items[i] = value

    def read_in(self, folder: Path) -> None:
        """Read into memory the tensors stored under `folder` (a checkpoint about to be removed)."""
        folder = Path(folder).resolve()
        self.items = [t.load() if isinstance(t, StoredTensor) and folder in t.path.resolve().parents else t
                      for t in self.items]


def stored_items(tensors: Sequence) -> list:
    """The entries of a per-layer list as saved: a TensorList's StoredTensors unread."""
    return list(tensors.items) if isinstance(tensors, TensorList) else list(tensors)


# safetensors' dtype names
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
              "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _write_streamed(path: Path, tensors: dict, metadata: dict[str, str] | None) -> None:
    """The safetensors format (an 8-byte header length, the JSON header, the tensors' bytes in header
    order) written one tensor at a time: a StoredTensor is read only while it is copied. safetensors'
    own writer needs every tensor in memory at once; its reader reads this file like its own."""
    import struct

    import torch  # here: seap._io stays importable without torch

    torch_dtype = {v: getattr(torch, k) for k, v in _ST_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, t in tensors.items():
        if isinstance(t, StoredTensor):
            dtype, shape = t.spec()
        else:
            dtype, shape = _ST_DTYPES[str(t.dtype).removeprefix("torch.")], list(t.shape)
        n = torch.empty((), dtype=torch_dtype[dtype]).element_size() * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for t in tensors.values():  # a StoredTensor is read here and freed with the next one
            t = t.load() if isinstance(t, StoredTensor) else t
            fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, atomically: by safetensors' save_file when every tensor is in memory, else
    (some are StoredTensors) streamed one tensor at a time. safetensors' error for a failed write (a
    full disk, say) becomes the OSError it wraps, so that callers handle every failed write one way."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            if any(isinstance(t, StoredTensor) for t in tensors.values()):
                _write_streamed(tmp, tensors, metadata)
            else:
                save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(err), str(path)) from None


class TensorFile(Mapping):
    """The tensors of a safetensors file by name, each read when it is asked for (`stored(key)` gives
    it unread)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), "pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str):
        return self.stored(key).load()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def stored(self, key: str) -> StoredTensor:
        if key not in self._keys:
            raise KeyError(key)
        return StoredTensor(self.path, key)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def is_temporary(name: str) -> bool:
    """A name that atomic_path / atomic_dir give their temporaries (and atomic_dir's swapped-out folder)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def _remove(path: Path) -> int:
    """Delete a file or folder; returns the bytes it held (0 when it vanished meanwhile)."""
    try:
        if path.is_dir() and not path.is_symlink():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
            return size
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def sweep_temporaries(path: str | Path) -> int:
    """Remove what killed writes left in and beside `path` (call it only while holding the folder's
    lock: a live run's temporaries look the same). Returns the bytes freed."""
    path = Path(path)
    freed = 0
    if path.parent.is_dir():  # atomic_dir / atomic_path of `path` itself
        for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
            if is_temporary(p.name):
                freed += _remove(p)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                if is_temporary(name):
                    freed += _remove(Path(root) / name)
            dirs[:] = [d for d in dirs if not is_temporary(d)]
    if freed:
        log.info("removed %.1f MB of temporaries that a stopped run left in %s", freed / 1e6, path)
    return freed


def write_error(path: str | Path, err: OSError, need: int | None = None) -> ArtifactError:
    """One line for a failed write of an output: a full disk says so (with what the output needs)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        size = (f" ({need / 1e9:.2f} GB in all)" if need >= 1e9 else f" ({need / 1e6:.1f} MB in all)") if need else ""
        return ArtifactError(f"the disk filled up while writing {path}{size}: free space or choose another --out; "
                             "its partial files were removed")
    return ArtifactError(f"could not write {path} ({err.strerror or err}): free space or choose another --out; "
                         "its partial files were removed")

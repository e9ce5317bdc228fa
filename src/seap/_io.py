"""Atomic file writes: a temp file in the same folder, fsync, then rename.

An interrupted run never leaves a half-written artifact under the final name. What a killed run
does leave (its `.<name>.<random>.tmp` files and folders, a `.<name>.old` folder caught mid-swap)
is recognised by `is_temporary` and removed by `sweep_temporaries` on the next run into the folder.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically; its own error for a failed write (a full disk, say) becomes the
    OSError it wraps, so that callers handle every failed write one way."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(err), str(path)) from None


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

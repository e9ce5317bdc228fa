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


def read_artifact(folder: str | Path, json_name: str, tensors_name: str, *, kind: str, fmt: str, version: int,
                  missing: str, redo: str) -> tuple[dict, dict]:
    """The JSON header and tensors of a saved folder (plan, router), checked for format and version.
    `missing` says which folder to give instead, `redo` how to rebuild a damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import ArtifactError
    from .outputs import check_folder

    folder = Path(folder)
    check_folder(folder)  # not one that a stopped run left half written
    js, st = folder / json_name, folder / tensors_name
    if not folder.is_dir() or not js.is_file() or not st.is_file():
        raise ArtifactError(f"{folder} is not a {kind} folder (needs {json_name} and {tensors_name}): {missing}")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{kind} {folder} is corrupt or truncated ({str(err)[:80]}): {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ArtifactError(f"{js} is not a seap {kind} (format {meta.get('format') if isinstance(meta, dict) else '?'})")
    got = meta.get("version")
    if got != version or isinstance(got, bool):
        # repr: a version written as the string "1" must not read "version 1 is not 1"
        hint = f" (the number {version}, not the text {got!r})" if str(got) == str(version) else ""
        raise ArtifactError(f"{js} has {kind} format version {got!r}, and this seap reads version {version}"
                            f"{hint}: {redo}")
    return meta, tensors


def prune_output_part(path: str | Path, part: str, marker: str) -> Path:
    """`seap prune --out OUT` writes OUT/plan/ and OUT/model/: OUT stands for either where one is
    expected. `path` itself when it holds `marker`, else its `part` subfolder when that does.
    Refused (seap.outputs) when the folder is incomplete or mixes two runs."""
    from .outputs import PRUNE_PARTS, check_folder, check_prune_output, read_manifest

    path = Path(path)
    if not (path / marker).is_file() and path.is_dir():
        manifest = read_manifest(path)
        if (manifest is not None and manifest.get("parts") == list(PRUNE_PARTS)) or any(
                (path / p).is_dir() for p in ("plan", "model")):
            check_prune_output(path)  # the whole folder, its part with it
            return path / part if (path / part / marker).is_file() else path
    check_folder(path)
    return path

"""Atomic file writes: a temp file in the same folder, fsync, then rename.

An interrupted run never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def read_artifact(folder: str | Path, json_name: str, tensors_name: str, *, kind: str, fmt: str, version: int,
                  missing: str, redo: str) -> tuple[dict, dict]:
    """The JSON header and tensors of a saved folder (plan, router), checked for format and version.
    `missing` says which folder to give instead, `redo` how to rebuild a damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import ArtifactError

    folder = Path(folder)
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
    if meta.get("version") != version:
        raise ArtifactError(f"{kind} format version {meta.get('version')} is not {version}: {redo}")
    return meta, tensors


def prune_output_part(path: str | Path, part: str, marker: str) -> Path:
    """`seap prune --out OUT` writes OUT/plan/ and OUT/model/: OUT stands for either where one is
    expected. `path` itself when it holds `marker`, else its `part` subfolder when that does."""
    path = Path(path)
    if not (path / marker).is_file() and (path / part / marker).is_file():
        return path / part
    return path

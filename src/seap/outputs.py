"""Output folders: one commit protocol for what `prune`, `collect`, `apply`, `export` and `route fit` write.

Writing. `with output_folder(out, "seap prune", parts) as o:` takes the folder's lock (a hidden
`.<name>.lock` beside it: a second run into the same folder refuses with the holder's process id, or
waits for it), then removes what killed runs left there (seap._io.sweep_temporaries). `o.begin()`,
called just before the first part is replaced, marks the folder incomplete in `seap-manifest.json`;
each part is still written atomically (seap._io); `o.commit()` writes the manifest last, with every
file's size and sha256. A run that fails, is interrupted or killed in between leaves the folder marked
incomplete, so no reader ever takes half of one run and half of another.

Reading. `check_folder(path)` refuses a folder marked incomplete, or whose files differ from its
manifest, with one line that says to run the command again; every reader of a seap folder
(`seap.load`, `Plan.load`, `Router.load`, `seap info`, and through them eval, generate and the
exports) calls it. Folders written before manifests existed have none: they are accepted when
complete (a prune output needs plan/ and model/, and the two must describe the same run).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ._io import MANIFEST, TensorFile, sweep_temporaries, write_error, write_json
from ._version import __version__
from .errors import ArtifactError, BusyError, SeapError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "seap-output"
MANIFEST_VERSION = 1
# Files up to this size are checksummed when written and checked on every read; bigger ones (the
# multi-GB shards of big models) by size only, as hashing them would cost seconds on each load.
CHECKSUM_BYTES = 1 << 30
PRUNE_PARTS = ("plan", "model", "summary.json", "summary.md")


# -- the lock ---------------------------------------------------------------------------------------
def lock_path(path: str | Path) -> Path:
    p = Path(path).absolute()
    return p.parent / f".{p.name}.lock"


def _holder(lock: Path) -> tuple[int | None, str]:
    """The process id and command written in a lock file (None when unreadable)."""
    try:
        pid, _, command = lock.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), command
    except (OSError, ValueError):
        return None, ""


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class FolderLock:
    """An exclusive flock on `.<name>.lock` beside the folder: the kernel drops it when its process
    dies, however it dies, so a killed run never blocks the next one."""

    def __init__(self, path: str | Path):
        self.target = Path(path)
        self.path = lock_path(path)
        self._fd: int | None = None

    def acquire(self, command: str, wait: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, cmd = _holder(self.path)
                who = f"process {pid}" + (f", `{cmd}`" if cmd else "") if pid else "another process"
                if not wait:
                    os.close(fd)
                    raise BusyError(f"{self.target} is being written by another seap run ({who}): wait for it to "
                                    "finish, or add --wait to wait for it") from None
                log.warning("waiting for %s, which is writing %s", who, self.target)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder removes the file on release: hold the lock of the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before closing, so that a waiter sees the file gone and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


# -- writing ----------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed(folder: Path, parts: Sequence[str] | None) -> list[Path]:
    """The files a manifest lists: those of `parts` (all of `folder` when None), hidden ones aside
    (locks, temporaries, resume checkpoints)."""
    roots = [folder / p for p in parts] if parts is not None else [folder]
    out = []
    for root in roots:
        for f in ([root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []):
            rel = f.relative_to(folder)
            if f.is_file() and rel.as_posix() != MANIFEST and not any(c.startswith(".") for c in rel.parts):
                out.append(f)
    return out


class Output:
    """One command's output folder while it is written (see the module's docstring)."""

    def __init__(self, folder: Path, command: str, parts: Sequence[str] | None, *, enabled: bool = True,
                 discard_parts: bool = False):
        self.folder, self.command = folder, command
        self.parts = list(parts) if parts is not None else None
        self.enabled, self.discard_parts = enabled, discard_parts
        self.begun = self.committed = False

    def _record(self, complete: bool) -> dict:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "command": self.command,
                "complete": complete, "parts": self.parts, "seap_version": __version__, "pid": os.getpid(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def begin(self) -> None:
        """Mark the folder incomplete: from here until commit() no reader takes it."""
        if self.enabled and not self.begun:
            write_json(self.folder / MANIFEST, self._record(False))
        self.begun = True

    def commit(self) -> None:
        """The manifest, written last: the folder is whole."""
        if not self.enabled:
            return
        self.begin()
        files = {}
        for f in _listed(self.folder, self.parts):
            size = f.stat().st_size
            files[f.relative_to(self.folder).as_posix()] = {
                "bytes": size, "sha256": _digest(f) if size <= CHECKSUM_BYTES else None}
        write_json(self.folder / MANIFEST, {**self._record(True), "files": files})
        self.committed = True

    def discard(self) -> None:
        """After a failure: remove this command's parts (the manifest still says incomplete)."""
        for p in self.parts or ():
            target = self.folder / p
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()


@contextmanager
def output_folder(path: str | Path | None, command: str, parts: Sequence[str] | None = None, *, wait: bool = False,
                  enabled: bool = True, discard_parts: bool = False) -> Iterator[Output]:
    """Hold `path`'s lock, sweep stale temporaries, and yield its Output (begin, write, commit).
    `parts`: the files and folders the command writes in it (None: the folder is one part, replaced
    whole); `path` None (nothing saved) or `enabled` False (a helper process under torchrun): nothing
    is locked or recorded. `discard_parts`: a failed run removes the parts it began to replace."""
    enabled = enabled and path is not None
    out = Output(Path(path) if path is not None else Path(), command, parts, enabled=enabled,
                 discard_parts=discard_parts)
    if not enabled:
        yield out
        return
    lock = FolderLock(path)
    lock.acquire(command, wait)
    try:
        sweep_temporaries(path)
        # a folder that is this command's alone (one part, nothing there before) goes whole after a failure
        fresh = parts is None and (not Path(path).exists() or not any(Path(path).iterdir()))

        def undo() -> str:
            """After a failure between begin and commit: what is left, said as the message's end."""
            if fresh:
                shutil.rmtree(path, ignore_errors=True)
                return "nothing was kept"
            if out.discard_parts:
                out.discard()
            return f"{path} is marked incomplete: run the command again"

        try:
            yield out
        except (SeapError, OSError) as err:
            if not out.begun or out.committed:
                raise
            if isinstance(err, OSError):  # a write that no writer turned into one line (a summary, say)
                err = write_error(path, err)
            raise type(err)(f"{err}; {undo()}") from None
        except BaseException:
            if out.begun and not out.committed:
                undo()
            raise
    finally:
        lock.release()


@contextmanager
def locked(path: str | Path | None, command: str, *, wait: bool = False, enabled: bool = True) -> Iterator[None]:
    """Only the lock and the sweep (a statistics folder shared between runs, a single output file)."""
    if path is None or not enabled:
        yield
        return
    lock = FolderLock(path)
    lock.acquire(command, wait)
    try:
        sweep_temporaries(path)
        yield
    finally:
        lock.release()


# -- reading ----------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    m = folder / MANIFEST
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{m} is corrupt: run the seap command that wrote {folder} again") from None
    return check_header(data, m, kind="manifest", fmt=MANIFEST_FORMAT, version=MANIFEST_VERSION,
                        redo=f"run the seap command that wrote {folder} again",
                        instead=f"remove it, or run the seap command that wrote {folder} again")


def _incomplete(folder: Path, command: str) -> ArtifactError:
    pid, cmd = _holder(lock_path(folder))
    if lock_path(folder).is_file() and pid != os.getpid() and _alive(pid):
        return ArtifactError(f"{folder} is being written by `{cmd or command}` (process {pid}): wait for it "
                             "to finish, then try again")
    return ArtifactError(f"{folder} is incomplete: the `{command}` run writing it stopped before the end: run "
                         "the command again")


def _verify(folder: Path, manifest: dict, prefix: str | None) -> None:
    command = str(manifest.get("command") or "seap")
    if manifest.get("complete") is not True:
        raise _incomplete(folder, command)
    for rel, entry in (manifest.get("files") or {}).items():
        if prefix is not None and rel != prefix and not rel.startswith(prefix + "/"):
            continue
        f = folder / rel
        why, size = None, f.stat().st_size if f.is_file() else None
        if size is None:
            why = "it is missing"
        elif size != entry.get("bytes"):
            why = f"it has {size:,} bytes, not the {entry.get('bytes'):,} written"
        elif entry.get("sha256") and _digest(f) != entry["sha256"]:
            why = "its checksum differs from the one written"
        if why:
            raise ArtifactError(f"{folder} is corrupt or truncated, or mixes two runs: {rel} is not the file "
                                f"`{command}` wrote ({why}): run the command again")


def check_folder(path: str | Path) -> None:
    """Refuse `path` when it, or the output folder it is a part of, is incomplete or differs from
    its manifest. A folder without a manifest (written before them) passes: see check_prune_output."""
    path = Path(path)
    if not path.is_dir():
        return
    own = read_manifest(path)
    if own is not None:
        _verify(path, own, None)
    parent = read_manifest(path.parent) if path.name else None
    if parent is not None and path.name in (parent.get("parts") or ()):
        _verify(path.parent, parent, path.name)


def check_prune_output(path: Path) -> None:
    """A `seap prune --out` folder as a whole: its manifest, or, for one written before manifests, its
    plan/ and model/ both there and describing the same run."""
    manifest = read_manifest(path)
    if manifest is not None:
        _verify(path, manifest, None)
        return
    plan_json, config_json = path / "plan" / "plan.json", path / "model" / "config.json"
    if not plan_json.is_file() and not config_json.is_file():
        return
    if not plan_json.is_file() or not config_json.is_file():
        have, lack = ("plan/", "model/") if plan_json.is_file() else ("model/", "plan/")
        raise ArtifactError(f"{path} is incomplete: it has {have} but no {lack} (a `seap prune` run into it "
                            "stopped before the end): run the command again")
    try:
        plan = json.loads(plan_json.read_text(encoding="utf-8"))
        record = json.loads(config_json.read_text(encoding="utf-8")).get("seap_pruning") or {}
        expert = (plan.get("experts") or {}).get(record.get("expert"), {})
        same = (plan.get("method") == record.get("method") and plan.get("target_ratio") == record.get("target_ratio")
                and expert.get("widths") == record.get("ffn_widths"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        same, plan, record = False, {}, {}
    if not same:
        raise ArtifactError(f"{path} mixes two runs: plan/ is {plan.get('method')}@{plan.get('target_ratio')} but "
                            f"model/ is {record.get('method')}@{record.get('target_ratio')} "
                            f"(expert {record.get('expert')}): run the command again")


def read_artifact(folder: str | Path, json_name: str, tensors_name: str, *, kind: str, fmt: str, version: int,
                  missing: str, redo: str) -> tuple[dict, TensorFile]:
    """The JSON header and tensors of a saved folder (plan, router), checked for format and version.
    `missing` says which folder to give instead, `redo` how to rebuild a damaged one."""
    from safetensors import SafetensorError

    folder = Path(folder)
    check_folder(folder)  # not one that a stopped run left half written
    js, st = folder / json_name, folder / tensors_name
    if not folder.is_dir() or not js.is_file() or not st.is_file():
        raise ArtifactError(f"{folder} is not a {kind} folder (needs {json_name} and {tensors_name}): {missing}")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        tensors = TensorFile(st)  # each tensor read when used: a big plan's refitted weights stay on disk
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{kind} {folder} is corrupt or truncated ({str(err)[:80]}): {redo}") from None
    return check_header(meta, js, kind=kind, fmt=fmt, version=version, redo=redo), tensors


def check_header(meta: object, where: str | Path, *, kind: str, fmt: str, version: int, redo: str,
                 instead: str | None = None) -> dict:
    """The one check of every artifact's header (plan, router, statistics, sensitivity, manifest): a JSON
    object whose "format" is `fmt` and whose "version" is `version`, else one line that says
    what the file is, what to give `instead` and how to `redo` it."""
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{where} is not a seap {kind} file (format {got or 'none'})"
                            f"{': ' + instead if instead else ''}")
    got = meta.get("version")
    if got != version or isinstance(got, bool):
        # repr: a version written as the string "1" must not read "version 1 is not 1"
        hint = f" (the number {version}, not the text {got!r})" if str(got) == str(version) else ""
        raise ArtifactError(f"{where} has {kind} format version {got!r}, and this seap reads version {version}"
                            f"{hint}: {redo}")
    return meta


def prune_output_part(path: str | Path, part: str, marker: str) -> Path:
    """`seap prune --out OUT` writes OUT/plan/ and OUT/model/: OUT stands for either where one is
    expected. `path` itself when it holds `marker`, else its `part` subfolder when that does.
    Refused (seap.outputs) when the folder is incomplete or mixes two runs."""
    path = Path(path)
    if not (path / marker).is_file() and path.is_dir():
        manifest = read_manifest(path)
        if (manifest is not None and manifest.get("parts") == list(PRUNE_PARTS)) or any(
                (path / p).is_dir() for p in ("plan", "model")):
            check_prune_output(path)  # the whole folder, its part with it
            return path / part if (path / part / marker).is_file() else path
    check_folder(path)
    return path

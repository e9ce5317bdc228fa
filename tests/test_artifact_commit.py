"""An output folder is one artifact (issue 31): written whole or refused, one run at a time, stale
temporaries swept; prompts checked at the edge; the tokenizer saved as loaded; messages that point the
right way. Kills are real (a child process that dies with os._exit in the middle of a write); a full
disk is an OSError(ENOSPC) injected into the shard writer."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seap
from conftest import one_line_error, tiny_folder

SRC = str(Path(seap.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}

# `seap ARGS` in a child process that dies (no cleanup, as under SIGKILL) after the first tensor of
# the model save: the stage after the plan's.
KILLED_IN_SAVE = """
import os, sys
from seap.model import checkpoint
write = checkpoint.ShardWriter.write
def dying(self, name, t):
    write(self, name, t)
    os._exit(137)
checkpoint.ShardWriter.write = dying
from seap.cli import main
sys.exit(main(sys.argv[1:]))
"""
# Holds the lock of argv[1] for argv[2] seconds, then releases it, or dies holding it (argv[3] == "die").
HOLD_LOCK = """
import os, sys, time
from seap.outputs import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire("seap prune")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "die":
    os._exit(9)
lock.release()
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("base"), "llama", num_hidden_layers=8)


def prune_args(base, out, ratio="0.5", *extra):
    return ["prune", "--model", str(base), "--method", "magnitude", "--ratio", ratio, "--out", str(out), *extra]


def prune(base, out, ratio="0.5", *extra):
    from seap.cli import main

    assert main(prune_args(base, out, ratio, *extra)) == 0


def child(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)


def hidden(folder: Path) -> list[str]:
    """Leftover temporaries anywhere in or beside `folder`."""
    names = [p.name for p in folder.rglob(".*")] + [p.name for p in folder.parent.glob(f".{folder.name}.*")]
    return [n for n in names if n.endswith((".tmp", ".old"))]


def assert_refused_everywhere(out: Path, capsys, *fragments) -> None:
    """No reader takes the folder, as a whole or a part, and each says why in one line."""
    from seap import Plan
    from seap.errors import ArtifactError

    one_line_error(["info", str(out)], capsys, *fragments)
    for target in (out, out / "plan"):
        if target.exists():
            with pytest.raises(ArtifactError, match="run the command again"):
                Plan.load(target)
    for target in (out, out / "model"):
        if target.exists():
            with pytest.raises(seap.SeapError, match="run the command again"):
                seap.load(target)


# -- 1. a kill between the stages of a save -----------------------------------------------------------
def test_kill_during_model_save_into_finished_folder(tmp_path, capsys, base):
    out = tmp_path / "o"
    prune(base, out, "0.5")
    r = child(KILLED_IN_SAVE, *prune_args(base, out, "0.3"))
    assert r.returncode == 137, r.stderr
    assert json.loads((out / "plan" / "plan.json").read_text())["target_ratio"] == 0.3  # the mixed state of old
    assert hidden(out), "the killed save leaves its temporary folder"
    assert_refused_everywhere(out, capsys, "is incomplete", "`seap prune`", "run the command again")
    from seap.cli import main

    assert main(prune_args(base, out, "0.3")) == 0  # the next run sweeps the temporaries and completes
    capsys.readouterr()
    assert not hidden(out)
    assert main(["info", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["target_ratio"] == data["model"]["target_ratio"] == 0.3


def test_kill_during_model_save_into_fresh_folder(tmp_path, capsys, base):
    out = tmp_path / "o"
    assert child(KILLED_IN_SAVE, *prune_args(base, out)).returncode == 137
    assert not (out / "model").exists() and (out / "plan").is_dir()
    assert_refused_everywhere(out, capsys, "is incomplete", "run the command again")


def test_disk_full_during_model_save(tmp_path, capsys, base, monkeypatch):
    from seap.model import checkpoint

    out = tmp_path / "o"
    prune(base, out, "0.5")

    def full(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.ShardWriter, "write", full)
    one_line_error(prune_args(base, out, "0.3"), capsys, "the disk filled up while writing", str(out / "model"),
                   "marked incomplete", "run the command again")
    # nothing readable is left: the parts this run began are gone, the folder says incomplete
    assert not (out / "plan").exists() and not (out / "model").exists() and not hidden(out)
    monkeypatch.undo()
    assert_refused_everywhere(out, capsys, "is incomplete")


def test_failed_summary_write_is_one_line(tmp_path, capsys, base, monkeypatch):
    """A write no writer wraps (the summary, after plan and model) is still one line, and refused."""
    from seap.pruning import prune as pruning

    def broken(path, text):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pruning, "write_text", broken)
    out = tmp_path / "o"
    one_line_error(prune_args(base, out), capsys, "could not write", "Input/output error", "marked incomplete")
    monkeypatch.undo()
    assert not (out / "model").exists()
    one_line_error(["info", str(out)], capsys, "is incomplete")


def test_run_refused_before_its_first_write_keeps_the_finished_folder(tmp_path, capsys, base):
    """A run refused before it writes anything (a bad plan expert, say) leaves the old folder readable."""
    from seap.cli import main

    out = tmp_path / "o"
    prune(base, out, "0.5")
    one_line_error(prune_args(base, out, "0.3", "--expert", "nosuch"), capsys, "no expert 'nosuch'")
    assert main(["info", str(out)]) == 0


# -- the manifest, and folders written before it --------------------------------------------------------
def test_manifest_lists_the_parts_and_catches_damage(tmp_path, capsys, base):
    out = tmp_path / "o"
    prune(base, out)
    m = json.loads((out / "seap-manifest.json").read_text())
    assert m["complete"] is True and m["command"] == "seap prune"
    assert {"plan/plan.json", "plan/indices.safetensors", "model/config.json", "model/model.safetensors",
            "summary.json", "summary.md"} <= set(m["files"])
    shard = out / "model" / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(raw))
    one_line_error(["info", str(out)], capsys, "model/model.safetensors", "checksum", "run the command again")
    with pytest.raises(seap.SeapError, match="checksum"):
        seap.load(out / "model")
    shard.write_bytes(bytes(raw[:100]))
    one_line_error(["generate", "--model", str(out), "hi"], capsys, "100 bytes", "run the command again")


def test_folder_without_manifest_still_loads_when_complete(tmp_path, capsys, base):
    from seap.cli import main

    out = tmp_path / "o"
    prune(base, out)
    (out / "seap-manifest.json").unlink()  # as an older seap wrote it
    assert main(["info", str(out)]) == 0
    assert seap.load(out).model.config.seap_pruning["target_ratio"] == 0.5
    assert seap.Plan.load(out).meta.target_ratio == 0.5


def test_folder_without_manifest_refused_when_mixed_or_incomplete(tmp_path, capsys, base):
    import shutil

    out, other = tmp_path / "o", tmp_path / "p"
    prune(base, out, "0.5")
    prune(base, other, "0.3")
    for f in (out, other):
        (f / "seap-manifest.json").unlink()
    shutil.rmtree(out / "plan")
    shutil.copytree(other / "plan", out / "plan")  # what a killed older seap left: plan 0.3, model 0.5
    one_line_error(["info", str(out)], capsys, "mixes two runs", "magnitude@0.3", "magnitude@0.5",
                   "run the command again")
    with pytest.raises(seap.SeapError, match="mixes two runs"):
        seap.load(out)
    shutil.rmtree(out / "model")
    one_line_error(["info", str(out)], capsys, "is incomplete", "no model/")
    assert seap.Plan.load(out / "plan").meta.target_ratio == 0.3  # the plan folder itself is whole


# -- 2. two runs on one folder ------------------------------------------------------------------------
def test_second_run_refused_with_the_holders_pid(tmp_path, capsys, base):
    out, plan = tmp_path / "o", tmp_path / "p"
    prune(base, plan)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "60", "release"], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(prune_args(base, out), capsys, "being written by another seap run",
                       f"process {holder.pid}", "--wait")
        one_line_error(["collect", "--model", str(base), "--out", str(out)], capsys, f"process {holder.pid}")
        one_line_error(["apply", "--model", str(base), "--plan", str(plan), "--out", str(out)], capsys,
                       f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "model").exists()


def test_wait_waits_for_the_holder(tmp_path, capsys, base):
    from seap.cli import main

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "2", "release"], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert main(prune_args(base, out, "0.5", "--wait")) == 0
    assert holder.wait(timeout=60) == 0
    assert main(["info", str(out)]) == 0


def test_reader_names_the_live_writer(tmp_path, capsys, base):
    """While a run writes the folder (marked incomplete, lock held), readers say who to wait for."""
    from seap.outputs import Output

    out = tmp_path / "o"
    prune(base, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "60", "release"], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        Output(out, "seap prune", ["plan", "model"]).begin()
        one_line_error(["info", str(out)], capsys, "is being written by", f"process {holder.pid}", "wait for it")
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_does_not_block(tmp_path, capsys, base):
    from seap.cli import main

    out = tmp_path / "o"
    r = child(HOLD_LOCK, out, "0", "die")
    assert r.returncode == 9
    assert any(p.name.endswith(".lock") for p in tmp_path.iterdir())  # left behind by the dead process
    assert main(prune_args(base, out)) == 0
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_two_real_runs_on_one_folder(tmp_path, base):
    """Two `seap prune` processes into one folder: at most one writes it; a refused one says why."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "seap", *prune_args(base, out)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # [0, 0]: the second started after the first finished
    for rc, err in results:
        if rc == 2:
            assert "being written by another seap run" in err.strip().splitlines()[-1]
    from seap.cli import main

    assert main(["info", str(out)]) == 0


# -- the other writers follow the same protocol ---------------------------------------------------------
def test_apply_collect_and_vllm_export_commit_a_manifest(tmp_path, capsys, base):
    from seap.cli import main

    out = tmp_path / "o"
    prune(base, out)
    assert main(["apply", "--model", str(base), "--plan", str(out), "--out", str(tmp_path / "a")]) == 0
    assert main(["collect", "--model", str(base), "--limit", "4", "--out", str(tmp_path / "s")]) == 0
    assert main(["export", "--format", "vllm", "--model", str(tmp_path / "a"), "--out", str(tmp_path / "v")]) == 0
    for folder, command in (("a", "seap apply"), ("s", "seap collect"), ("v", "seap export")):
        m = json.loads((tmp_path / folder / "seap-manifest.json").read_text())
        assert m["complete"] and m["command"] == command and m["files"], folder
    assert "default.safetensors" in json.loads((tmp_path / "s" / "seap-manifest.json").read_text())["files"]
    # an apply killed in its save is refused by the exports, and the next apply completes it
    assert child(KILLED_IN_SAVE, "apply", "--model", base, "--plan", out, "--out", tmp_path / "a").returncode == 137
    one_line_error(["export", "--format", "vllm", "--model", str(tmp_path / "a"), "--out", str(tmp_path / "v2")],
                   capsys, "is incomplete", "`seap apply`")
    assert main(["apply", "--model", str(base), "--plan", str(out), "--out", str(tmp_path / "a")]) == 0
    assert not hidden(tmp_path / "a")


def test_route_fit_is_locked(tmp_path, capsys, base):
    out = tmp_path / "o"
    prune(base, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / "router"), "60", "release"], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(["route", "fit", "--model", str(base), "--plan", str(out / "plan")], capsys,
                       "being written by another seap run", f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


# -- 3, 4. prompts at the edge ----------------------------------------------------------------------
def test_invalid_utf8_prompt_on_the_command_line(tmp_path, base):
    r = subprocess.run([sys.executable, "-m", "seap", "generate", "--model", str(base), b"caf\xe9 \xff\xfe"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.strip().splitlines() if "it/s]" not in ln]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("seap: error: prompt 1 is not valid UTF-8 (byte 0xe9 at character 4)"), lines


def test_invalid_utf8_prompt_in_the_api(base):
    with pytest.raises(seap.SeapError, match="not valid UTF-8"):
        seap.generate(str(base), ["ok", "caf\udce9"])


def test_prompt_longer_than_the_positions(tmp_path, capsys):
    folder = tiny_folder(tmp_path, "llama", max_position_embeddings=64)
    one_line_error(["generate", "--model", str(folder), "--max-new-tokens", "8", "x" * 60], capsys,
                   "prompt 1 has 60 tokens", "64 positions", "--max-new-tokens", "at most 56")
    from seap.cli import main

    assert main(["generate", "--model", str(folder), "--max-new-tokens", "8", "x" * 50]) == 0


# -- 5. the tokenizer as loaded ------------------------------------------------------------------------
def test_default_prune_saves_the_tokenizer_as_loaded(tmp_path, base):
    from tokenizers import Tokenizer

    from seap.cli import main

    out = tmp_path / "o"
    assert main(["prune", "--model", str(base), "--ratio", "0.3", "--limit", "4", "--max-length", "16",
                 "--out", str(out)]) == 0
    data = json.loads((out / "model" / "tokenizer.json").read_text())
    assert data["truncation"] is None and data["padding"] is None
    assert len(Tokenizer.from_file(str(out / "model" / "tokenizer.json")).encode("y" * 100).ids) == 100


def test_save_tokenizer_keeps_a_loaded_setting(tmp_path):
    """What the file had is what is saved (not merely nothing), whatever calibration set meanwhile."""
    from seap.model.tokenizer import load_tokenizer, save_tokenizer
    from conftest import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.backend_tokenizer.enable_truncation(1000)
    tok.save_pretrained(tmp_path / "t")
    loaded = load_tokenizer(tmp_path / "t")
    loaded(["a" * 40], padding=True, truncation=True, max_length=8)  # as calibration does
    save_tokenizer(loaded, tmp_path / "u")
    assert json.loads((tmp_path / "u" / "tokenizer.json").read_text())["truncation"]["max_length"] == 1000
    assert loaded.backend_tokenizer.truncation["max_length"] == 8  # the object itself is left as it was


# -- 6. messages that pointed the wrong way -------------------------------------------------------------
def test_plan_messages(tmp_path, capsys, base):
    out = tmp_path / "o"
    prune(base, out)
    plan_json = out / "plan" / "plan.json"
    (out / "seap-manifest.json").unlink()  # hand-edited plans: the manifest would refuse them first
    meta = json.loads(plan_json.read_text())
    plan_json.write_text(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))
    one_line_error(["info", str(out / "plan")], capsys, "has no field 'fingerprint'")
    plan_json.write_text(json.dumps({**meta, "version": "1"}))
    one_line_error(["info", str(out / "plan")], capsys, "version '1'", "the number 1, not the text '1'")


def test_corrupt_shard_of_a_seap_folder_says_to_run_seap_again(tmp_path, capsys, base):
    from seap.cli import main

    def error(argv) -> str:
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("seap: error:") and "download" not in line, line
        return line

    out = tmp_path / "o"
    prune(base, out)
    shard = out / "model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    assert "run the command again" in error(["info", str(out)])  # the manifest speaks first
    (out / "seap-manifest.json").unlink()  # an older seap's folder: the shard check speaks
    line = error(["info", str(out / "model")])
    assert "truncated or corrupt" in line and "seap prune" in line, line
    assert "seap prune" in error(["export", "--format", "vllm", "--model", str(out), "--out", str(tmp_path / "v")])


def test_shard_size_zero_and_unknown_task_are_refused_up_front(tmp_path, capsys, base, monkeypatch):
    from seap.pruning import prune as pruning

    one_line_error(prune_args(base, tmp_path / "o", "0.5", "--shard-size", "0"), capsys,
                   "--shard-size must be at least one byte, got '0'")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the task name was checked")

    monkeypatch.setattr(pruning, "open_for_pruning", no_load)
    one_line_error(prune_args(base, tmp_path / "o", "0.5", "--task", "nosuch"), capsys, "unknown task or corpus 'nosuch'")
    one_line_error(["collect", "--model", str(base), "--task", "nosuch", "--out", str(tmp_path / "s")], capsys,
                   "unknown task or corpus 'nosuch'")
    assert not (tmp_path / "o").exists()


def test_a_full_disk_in_a_safetensors_write_is_an_oserror_and_in_a_checkpoint_one_line(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError ("I/O error: No space left on device (os error
    28)"): seap turns it into the OSError it wraps, and the calibration checkpoint into one line (found by hand:
    a prune into a 40 MB tmpfs ended in a traceback from inside safetensors)."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from seap import _io
    from seap.calibration.resume import Resume
    from seap.errors import ArtifactError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        _io.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # no temporary left
    resume = Resume(tmp_path / "stats", "prune", {"a": 1})
    with pytest.raises(ArtifactError, match="the disk filled up while writing"):
        resume.save_layer(0, {"t": torch.zeros(2)}, [torch.zeros(1)], last=False)


def test_tensors_streamed_from_disk_read_like_safetensors_own_file(tmp_path):
    """A file with tensors left on disk (StoredTensor) is written one tensor at a time in safetensors'
    format: safetensors reads it back equal, dtypes, shapes and metadata included."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from seap._io import StoredTensor, TensorFile, TensorList, save_tensors

    src = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "f64": torch.tensor(2.5, dtype=torch.float64),
           "bool": torch.tensor([True, False, True]), "i64": torch.arange(7), "empty": torch.zeros(0, 3),
           "f16": torch.randn(2, 3, 2).half()}
    save_file(src, str(tmp_path / "src.safetensors"))
    mixed = {"in_memory": torch.ones(2, 2), **{f"on_disk/{k}": StoredTensor(tmp_path / "src.safetensors", k) for k in src}}
    save_tensors(tmp_path / "out.safetensors", mixed, {"note": "streamed"})
    got = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(got) == sorted(mixed)
    assert torch.equal(got["in_memory"], torch.ones(2, 2))
    for k, v in src.items():
        assert got[f"on_disk/{k}"].dtype == v.dtype and torch.equal(got[f"on_disk/{k}"], v), k
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "streamed"}
    lazy = TensorFile(tmp_path / "out.safetensors")
    assert len(lazy) == len(mixed) and "on_disk/bf16" in lazy and "nothing" not in lazy
    listed = TensorList([lazy.stored("on_disk/f32"), torch.zeros(1)])
    assert torch.equal(listed[0], src["f32"]) and isinstance(listed.items[0], StoredTensor)
    listed.read_in(tmp_path)
    assert isinstance(listed.items[0], torch.Tensor)

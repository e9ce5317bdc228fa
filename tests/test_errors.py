"""Bad input: one clear error line from the CLI (exit 2) and no half-written output."""

import json
import shutil

import pytest
from conftest import make_loaded, tiny_folder

from seap.cli import main
from seap.errors import ArtifactError, ConfigError, DataError, ModelError


def run(capsys, *argv):
    capsys.readouterr()  # drop output of fixtures
    rc = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def assert_one_error(rc, err, needle):
    assert rc == 2
    assert not any("Traceback" in line for line in err), err
    err = [line for line in err if "it/s]" not in line and "s/it]" not in line]  # progress bars
    assert len(err) == 1 and err[0].startswith("seap: error:"), err
    assert needle in err[0], err[0]


@pytest.fixture
def tiny(tmp_path):
    return tiny_folder(tmp_path, "llama", num_hidden_layers=8)


def test_unknown_model_type(tmp_path, capsys):
    folder = tiny_folder(tmp_path, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "prune", "--model", folder, "--out", tmp_path / "o")
    assert_one_error(rc, err, "unsupported model_type 'gpt_bigcode': seap supports")
    assert "llama" in err[-1] and "opt" in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.2])
def test_ratio_out_of_range(tmp_path, capsys, tiny, ratio):
    rc, err = run(capsys, "prune", "--model", tiny, "--ratio", ratio, "--out", tmp_path / "o")
    assert_one_error(rc, err, "strictly between 0 and 1")
    assert not (tmp_path / "o").exists()


def test_empty_corpus(tmp_path, capsys, tiny):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    rc, err = run(capsys, "prune", "--model", tiny, "--task", empty, "--out", tmp_path / "o")
    assert_one_error(rc, err, "empty")
    assert not (tmp_path / "o" / "plan").exists() and not (tmp_path / "o" / "model").exists()


def test_missing_data_folder(tmp_path, capsys, tiny):
    rc, err = run(capsys, "prune", "--model", tiny, "--task", "piqa", "--data-dir", tmp_path / "nope",
                  "--out", tmp_path / "o")
    assert_one_error(rc, err, "does not exist")
    assert not (tmp_path / "o" / "model").exists()


def test_missing_data_file(tmp_path, capsys, tiny):
    rc, err = run(capsys, "prune", "--model", tiny, "--task", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert_one_error(rc, err, "nope.jsonl")
    (tmp_path / "d" / "piqa").mkdir(parents=True)  # a data folder without the task's split file
    rc, err = run(capsys, "prune", "--model", tiny, "--task", "piqa", "--data-dir", tmp_path / "d",
                  "--out", tmp_path / "o")
    assert_one_error(rc, err, "piqa")
    assert not (tmp_path / "o" / "model").exists()


def test_missing_model_folder(tmp_path, capsys):
    rc, err = run(capsys, "prune", "--model", tmp_path / "no-such-model", "--out", tmp_path / "o")
    assert_one_error(rc, err, "does not exist")


def prune_tiny(tmp_path, capsys, folder, out, *extra):
    rc, err = run(capsys, "prune", "--model", folder, "--ratio", "0.5", "--method", "wanda-sp", "--out", out, *extra)
    assert rc == 0, err
    return out


def test_plan_for_another_model_is_refused(tmp_path, capsys):
    a = tiny_folder(tmp_path / "a", "llama")
    b = tiny_folder(tmp_path / "b", "llama", intermediate_size=96)  # another geometry
    out = prune_tiny(tmp_path, capsys, a, tmp_path / "o")
    rc, err = run(capsys, "apply", "--model", b, "--plan", out / "plan", "--out", tmp_path / "applied")
    assert_one_error(rc, err, "made for another model")
    assert not (tmp_path / "applied").exists()
    # Same geometry, different weights: refused too.
    from conftest import tiny_llama

    other = tiny_llama(vocab_size=260)
    import torch

    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(tmp_path / "c")
    shutil.copy(a / "tokenizer.json", tmp_path / "c")
    shutil.copy(a / "tokenizer_config.json", tmp_path / "c")
    rc, err = run(capsys, "apply", "--model", tmp_path / "c", "--plan", out / "plan", "--out", tmp_path / "applied")
    assert_one_error(rc, err, "different weights")
    # And the right model is accepted.
    rc, err = run(capsys, "apply", "--model", a, "--plan", out / "plan", "--out", tmp_path / "applied")
    assert rc == 0, err


def test_corrupt_or_truncated_plan(tmp_path, capsys, tiny):
    out = prune_tiny(tmp_path, capsys, tiny, tmp_path / "o")
    idx = out / "plan" / "indices.safetensors"
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 2])
    rc, err = run(capsys, "apply", "--model", tiny, "--plan", out / "plan", "--out", tmp_path / "x")
    assert_one_error(rc, err, "corrupt or truncated")
    (out / "plan" / "plan.json").write_text('{"format": "seap-plan", "vers')
    rc, err = run(capsys, "info", out / "plan")
    assert_one_error(rc, err, "corrupt or truncated")
    assert not (tmp_path / "x").exists()


def test_corrupt_or_truncated_stats(tmp_path, capsys, tiny):
    rc, err = run(capsys, "collect", "--model", tiny, "--out", tmp_path / "s")
    assert rc == 0, err
    f = tmp_path / "s" / "default.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    rc, err = run(capsys, "prune", "--model", tiny, "--stats-dir", tmp_path / "s", "--out", tmp_path / "o")
    assert_one_error(rc, err, "corrupt or truncated")
    f.write_bytes(b"\x00" * 64)
    rc, err = run(capsys, "prune", "--model", tiny, "--stats-dir", tmp_path / "s", "--out", tmp_path / "o")
    assert_one_error(rc, err, "corrupt or truncated")
    assert not (tmp_path / "o" / "model").exists()


def test_stats_of_another_model_are_refused(tmp_path, capsys):
    a = tiny_folder(tmp_path / "a", "llama")
    b = tiny_folder(tmp_path / "b", "llama", intermediate_size=96)
    assert run(capsys, "collect", "--model", a, "--out", tmp_path / "s")[0] == 0
    rc, err = run(capsys, "prune", "--model", b, "--stats-dir", tmp_path / "s", "--out", tmp_path / "o")
    assert_one_error(rc, err, "another model")


def test_unsupported_head_mode_on_gqa(tmp_path, capsys, tiny):
    rc, err = run(capsys, "prune", "--model", tiny, "--heads", "heads", "--out", tmp_path / "o")
    assert_one_error(rc, err, "grouped-query attention")


@pytest.mark.parametrize("argv", [["generate", "hi", "--griffin-shared"], ["generate", "hi", "--griffin", 0],
                                  ["bench", "--griffin-shared", "--repeats", 1]])
def test_griffin_options_without_a_valid_density(capsys, tiny, argv):
    rc, err = run(capsys, argv[0], "--model", tiny, *argv[1:])
    assert_one_error(rc, err, "--griffin" if "--griffin-shared" in argv else "density must be in (0, 1]")


def test_interrupted_write_leaves_no_artifact(tmp_path, monkeypatch):
    from seap import Plan

    lm = make_loaded("llama")
    from seap import PruneConfig
    from seap.model.fingerprints import fingerprint
    from seap.pruning.plan import build_plan

    plan = build_plan(lm.model, lm.adapter, PruneConfig.from_method("magnitude"), {"t": None}, base_model="x",
                      revision=None, fingerprint=fingerprint(lm.model, lm.adapter))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("seap.pruning.plan.save_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        plan.save(tmp_path / "plan")
    assert list(tmp_path.iterdir()) == []  # no final folder, no temp left behind
    with pytest.raises(ArtifactError):
        Plan.load(tmp_path / "plan")


def test_error_classes_are_value_errors():
    for cls in (ConfigError, DataError, ModelError, ArtifactError):
        assert issubclass(cls, ValueError)

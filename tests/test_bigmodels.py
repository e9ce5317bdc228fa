"""Big models: the layer-by-layer path against the whole-model path, sharded folders, resume, errors.

Every check runs on tiny random checkpoints of each family saved in bfloat16 (as 7B-70B
checkpoints ship), so the dtype handling is exercised as well as the streaming.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, TEXTS, byte_level_tokenizer, one_line_error

from seap import PruneConfig, Runtime, prune
from seap.calibration.layerwise import collect_stats, layerwise_stats
from seap.cli import main
from seap.errors import ConfigError, ModelError
from seap.model import runtime as rt_mod
from seap.model.checkpoint import Checkpoint, ShardWriter
from seap.model.loading import load_model, open_model

CPU = torch.device("cpu")


def bf16_folder(tmp_path: Path, family: str, name: str = "ckpt", shard: str | None = None) -> Path:
    """A tiny random checkpoint of `family` as hub checkpoints ship: bf16 safetensors, real tokenizer."""
    model = FAMILIES[family](vocab_size=260).to(torch.bfloat16)
    folder = tmp_path / f"{name}-{family}"
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _close(a, b, rtol=1e-6):
    for x, y in zip(a, b):
        for f in ("mean", "m2", "sumsq"):
            u, v = getattr(x, f), getattr(y, f)
            assert torch.allclose(u, v, rtol=rtol, atol=rtol * float(v.abs().max() + 1e-30)), f
        assert x.count == y.count


def test_layerwise_statistics_equal_whole_model_statistics(tmp_path, family):
    folder = bf16_folder(tmp_path, family)
    lm = load_model(str(folder))  # float32, whole
    heads = family == "opt"
    whole = collect_stats(lm.model, lm.tokenizer, lm.adapter, TEXTS, heads=heads, batch_size=4, progress=False)
    res = layerwise_stats(Checkpoint.open(folder), lm.model.config, lm.tokenizer, {"t": TEXTS}, heads=heads,
                          batch_size=4, device=CPU, dtype=torch.float32, progress=False)
    _close(res.stats["t"].ffn, whole.ffn)
    if heads:
        _close(res.stats["t"].attn, whole.attn)
    assert res.max_resident_layers == 1


@pytest.mark.parametrize("method", ["seap", "flap"])
def test_streamed_pruning_equals_whole_model_pruning_tensor_for_tensor(tmp_path, family, method):
    folder = bf16_folder(tmp_path, family, shard="40KB")  # several source shards
    cfg = PruneConfig.from_method(method, ratio=0.4, protect_first=1, protect_last=1)
    runs = {}
    for load in ("whole", "layerwise"):
        res = prune(str(folder), cfg, [str(_corpus(tmp_path))], tmp_path / load, progress=False,
                    runtime=Runtime(device="cpu", load=load), shard_size="30KB")
        assert res.path == load
        runs[load] = Checkpoint.open(tmp_path / load / "model")
    whole, streamed = runs["whole"], runs["layerwise"]
    assert len({t.file for t in whole.tensors.values()}) > 1  # sharded output, with an index
    assert (tmp_path / "layerwise" / "model" / "model.safetensors.index.json").is_file()
    assert sorted(whole.names()) == sorted(streamed.names())
    a, b = whole.read(whole.names()), streamed.read(streamed.names())
    for name in a:
        assert a[name].dtype == torch.bfloat16 or not a[name].is_floating_point()  # the checkpoint's own dtype
        assert torch.equal(a[name], b[name]), name
    summary = json.loads((tmp_path / "layerwise" / "summary.json").read_text())
    assert summary["max_resident_layers"] <= 2  # the acceptance bound (it is 1: one layer at a time)
    # fixed widths with reconstruction: one pass (statistics, choice and refit of a layer while it is read)
    one = cfg.reconstructs and cfg.allocation.name != "adaptive"
    stages = {"load", "slice_and_save"} | ({"calibration"} if one else {"statistics", "plan"})
    assert set(summary["stage_seconds"]) == stages


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.mark.parametrize("ratio_cfg", [dict(allocation="uniform"), dict(protect_first=1, protect_last=1)])
def test_sharded_save_and_reload_give_identical_logits(tmp_path, family, ratio_cfg):
    folder = bf16_folder(tmp_path, family)
    cfg = PruneConfig.from_method("seap", ratio=0.5, **ratio_cfg)
    res = prune(str(folder), cfg, [str(_corpus(tmp_path))], tmp_path / "out", progress=False,
                runtime=Runtime(device="cpu", load="whole"), shard_size="20KB")
    ids = torch.tensor([[5, 9, 40, 7, 99, 3, 12]])
    # In memory the sliced model is float32 from bf16 weights; the folder holds those bf16 values.
    ref = res.model.model(ids).logits
    ckpt = Checkpoint.open(tmp_path / "out" / "model")
    assert len({t.file for t in ckpt.tensors.values()}) > 1
    for dtype in (torch.float32, torch.bfloat16):
        again = load_model(str(tmp_path / "out" / "model"), dtype=dtype)
        assert next(again.model.parameters()).dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(again.model(ids).logits, ref)
    mapped = load_model(str(tmp_path / "out" / "model"), device_map="auto")  # accelerate's placement
    assert torch.equal(mapped.model(ids).logits, ref)


def test_a_killed_layerwise_pass_resumes_from_its_last_layer(tmp_path, monkeypatch):
    folder = bf16_folder(tmp_path, "llama")
    lm = load_model(str(folder))
    ckpt = Checkpoint.open(folder)
    kwargs = dict(batch_size=4, device=CPU, dtype=torch.float32, progress=False, checkpoint_overhead=1e9)
    clean = layerwise_stats(ckpt, lm.model.config, lm.tokenizer, {"t": TEXTS}, **kwargs)

    import seap.calibration.layerwise as lw

    real = lw.LayerWeights.of_layer
    calls = {"n": 0}

    def dies_at_layer_4(layer, adapter):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a kill while layer 4 runs
        return real(layer, adapter)

    monkeypatch.setattr(lw.LayerWeights, "of_layer", staticmethod(dies_at_layer_4))
    with pytest.raises(KeyboardInterrupt):
        layerwise_stats(ckpt, lm.model.config, lm.tokenizer, {"t": TEXTS}, resume_dir=tmp_path / "r", **kwargs)
    monkeypatch.setattr(lw.LayerWeights, "of_layer", staticmethod(real))
    again = layerwise_stats(ckpt, lm.model.config, lm.tokenizer, {"t": TEXTS}, resume_dir=tmp_path / "r", **kwargs)
    assert again.resumed_after == 3  # layers 0..3 were not run again
    for a, b in zip(again.stats["t"].ffn, clean.stats["t"].ffn):
        assert a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    assert not any((tmp_path / "r").iterdir())  # the resume folder goes once the pass is complete


# -- bad input: one clear line, nothing half-written ---------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(capsys):
    one_line_error(["prune", "--device", "cuda", "--ratio", "0.5"], capsys, "no CUDA GPU", "--device cpu")


def test_a_dtype_the_device_cannot_run(tmp_path, monkeypatch, capsys):
    folder = bf16_folder(tmp_path, "llama")
    monkeypatch.setattr(rt_mod, "dtype_supported", lambda device, dtype: dtype != torch.bfloat16)
    one_line_error(["prune", "--model", str(folder), "--method", "wanda-sp", "--dtype", "bfloat16", "--out", str(tmp_path / "o")], capsys,
                    "bfloat16 cannot run on cpu")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError):
        Runtime(dtype="float8")


def test_missing_and_truncated_shards(tmp_path, capsys):
    folder = bf16_folder(tmp_path, "llama", shard="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    one_line_error(["prune", "--model", str(folder), "--out", str(tmp_path / "o")], capsys, "truncated or corrupt",
                    shards[1].name)
    shards[1].unlink()
    one_line_error(["prune", "--model", str(folder), "--out", str(tmp_path / "o")], capsys, "missing shard",
                    shards[1].name)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("load", ["whole", "layerwise"])
def test_a_disk_that_fills_up_during_the_save(tmp_path, monkeypatch, capsys, load):
    folder = bf16_folder(tmp_path, "llama")
    real = ShardWriter.write
    written = {"n": 0}

    def full_disk(self, name, tensor):
        written["n"] += 1
        if written["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    out = tmp_path / "o"
    one_line_error(["prune", "--model", str(folder), "--load", load, "--method", "wanda-sp", "--limit", "4",
                     "--out", str(out)], capsys,
                    "disk filled up", "partial files were removed", "marked incomplete: run the command again")
    assert not (out / "model").exists() and not (out / "plan").exists()  # the parts it had begun are gone
    assert not [p for p in out.iterdir() if p.name.startswith(".model")]  # no temp folder left behind


def test_not_enough_memory_for_a_forced_whole_model(tmp_path, monkeypatch, capsys):
    folder = bf16_folder(tmp_path, "llama")
    monkeypatch.setattr(rt_mod, "available_memory", lambda device: 10_000)
    one_line_error(["prune", "--model", str(folder), "--load", "whole", "--out", str(tmp_path / "o")], capsys,
                    "not enough memory", "--load layerwise")
    # auto takes the layer-by-layer path instead
    lm = open_model(str(folder), Runtime(device="cpu"), streamable=True)
    assert type(lm).__name__ == "LazyModel"
    with pytest.raises(ModelError, match="--device-map auto"):
        open_model(str(folder), Runtime(device="cpu"))  # eval, generate: the model must fit


def test_layerwise_needs_safetensors(capsys):
    one_line_error(["prune", "--load", "layerwise", "--ratio", "0.5"], capsys, "--load whole")


def test_apply_and_collect_stream_like_the_whole_path(tmp_path):
    folder = bf16_folder(tmp_path, "gemma3")
    corpus = str(_corpus(tmp_path))
    for load in ("whole", "layerwise"):
        assert main(["collect", "--model", str(folder), "--load", load, "--task", corpus, "--out",
                     str(tmp_path / f"stats-{load}")]) == 0
    from seap.calibration.stats import ActivationStats

    name = f"{Path(corpus).name}.safetensors"
    a, b = (ActivationStats.load(tmp_path / f"stats-{x}" / name) for x in ("whole", "layerwise"))
    _close(a.ffn, b.ffn)
    assert main(["prune", "--model", str(folder), "--method", "wanda-sp", "--task", corpus, "--out",
                 str(tmp_path / "p")]) == 0
    for load in ("whole", "layerwise"):
        assert main(["apply", "--model", str(folder), "--load", load, "--plan", str(tmp_path / "p" / "plan"),
                     "--out", str(tmp_path / f"apply-{load}")]) == 0
    x, y = (Checkpoint.open(tmp_path / f"apply-{t}") for t in ("whole", "layerwise"))
    tx, ty = x.read(x.names()), y.read(y.names())
    assert tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


def test_saved_statistics_are_reused_only_for_the_same_texts(tmp_path):
    """A stats folder names its files by corpus: an edited corpus file under the same name is recollected
    (equal to a fresh collection of the new texts), an unchanged one is reused as it was saved."""
    from seap import collect

    folder = bf16_folder(tmp_path, "llama")
    corpus, out = _corpus(tmp_path), tmp_path / "stats"
    lm = load_model(str(folder), device="cpu")
    old = collect(lm, [str(corpus)], out, progress=False)[str(corpus)]
    assert torch.equal(collect(lm, [str(corpus)], out, progress=False)[str(corpus)].ffn[0].sumsq, old.ffn[0].sumsq)
    corpus.write_text("\n".join(reversed(TEXTS[1:])) + "\n")
    again = collect(lm, [str(corpus)], out, progress=False)[str(corpus)]
    fresh = collect(lm, [str(corpus)], None, progress=False)[str(corpus)]
    assert again.meta["texts"] == fresh.meta["texts"] != old.meta["texts"]
    assert torch.equal(again.ffn[0].sumsq, fresh.ffn[0].sumsq)
    assert not torch.equal(again.ffn[0].sumsq, old.ffn[0].sumsq)


def test_generate_and_info_on_a_pruned_folder_with_a_device_map(tmp_path, capsys):
    folder = bf16_folder(tmp_path, "llama")
    out = tmp_path / "o"
    assert main(["prune", "--model", str(folder), "--load", "layerwise", "--method", "seap", "--protect-first", "1",
                 "--protect-last", "1", "--task", str(_corpus(tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16" and info["params"] == Checkpoint.open(out / "model").n_params
    for extra in (["--device-map", "auto"], ["--dtype", "bfloat16"]):
        assert main(["generate", "--model", str(out / "model"), *extra, "--max-new-tokens", "3", "--json",
                     "hello"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[0]["prompt"] == "hello"

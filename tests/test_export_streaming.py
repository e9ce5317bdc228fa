"""Streamed exports (a pruned folder, or a base checkpoint + plan, read layer by layer from its
shards) against the in-memory export of the same model: GGUF byte for byte, vLLM tensor for
tensor; at most two decoder layers in memory; nothing half-written when an export fails."""

from __future__ import annotations

import errno
import copy
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, byte_level_tokenizer, one_line_error, plan_for
from safetensors.torch import load_file, save_file

from seap import PruneConfig
from seap.errors import ArtifactError, ModelError
from seap.export import ExportSource, GGUFConfig, export_gguf, export_model, export_vllm, open_source
from seap.model.checkpoint import Checkpoint, ShardWriter
from seap.model.loading import load_model
from seap.model.pruned_folder import save_pruned
from seap.outputs import MANIFEST
from seap.pruning.surgery import sliced

CASES = {  # family, method, options: uniform and per-layer widths where llama.cpp's architecture allows them
    "llama-uniform": ("llama", "wanda-sp", {}),
    "llama-per-layer": ("llama", "seap", {"multiple": 8}),
    "gemma3-uniform": ("gemma3", "wanda-sp", {}),
}
MODEL_KW = {"llama": {"intermediate_size": 64},
            # Gemma 3 checkpoints scale attention by 1/sqrt(head_dim): the tiny one must, as llama.cpp does
            "gemma3": {"intermediate_size": 64, "query_pre_attn_scalar": 8}}


def bf16_folder(folder: Path, family: str, **kw) -> Path:
    """A tiny random checkpoint as hub checkpoints ship: bf16, several shards, a real tokenizer."""
    model = FAMILIES[family](vocab_size=260, **{**MODEL_KW[family], **kw}).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")
    byte_level_tokenizer(merges=True).save_pretrained(folder)  # llama.cpp needs BPE merges
    return folder


class Case:
    def __init__(self, root: Path, family: str, method: str, options: dict):
        self.base = bf16_folder(root / "base", family)
        dense = load_model(str(self.base))  # float32 in memory
        protect = 0 if method == "wanda-sp" else 1
        cfg = PruneConfig.from_method(method, ratio=0.5, protect_first=protect, protect_last=protect, **options)
        plan, _ = plan_for(dense, cfg)
        self.plan = plan.save(root / "plan")
        self.lm = sliced(dense, plan, plan.expert(None)[0])  # the in-memory path
        self.widths = [dense.adapter.d_ff(layer) for layer in dense.adapter.layers(self.lm.model)]
        self.pruned = save_pruned(self.lm.model, dense.tokenizer, root / "pruned", dtype=torch.bfloat16,
                                  max_shard_bytes=30_000)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> Case:
    family, method, options = CASES[request.param]
    return Case(tmp_path_factory.mktemp(request.param), family, method, options)


# -- equal to the in-memory export ------------------------------------------------------------------
def _whole_file_rewrite(path: Path, out: Path) -> bytes:
    """The same metadata and tensors written by the gguf package's whole-file path (add_tensor, then
    write_tensors_to_file): what the streamed header-then-tensors protocol must reproduce."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            main = f.types[0]
            w.add_key_value(key, f.contents(), main, sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out.read_bytes()


@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
def test_streamed_gguf_equals_the_in_memory_file_byte_for_byte(case, tmp_path, out_type):
    cfg = GGUFConfig(out_type=out_type)
    ref = export_gguf(case.lm, tmp_path / "memory.gguf", cfg, progress=False)
    assert not ref.streamed
    want = ref.path.read_bytes()
    for name, kw in (("folder", {}), ("plan", {"plan": str(case.plan)})):
        model = case.pruned if name == "folder" else case.base
        rep = export_model(str(model), tmp_path / f"{name}.gguf", out_type=out_type, progress=False, **kw)
        assert rep["streamed"] and rep["max_resident_layers"] == 1, name
        assert (tmp_path / f"{name}.gguf").read_bytes() == want, name
    if out_type == "q8_0" and len(set(case.widths)) > 1:
        assert _whole_file_rewrite(ref.path, tmp_path / "rewritten.gguf") == want


def test_a_dense_checkpoint_streams_too_with_llama3_rope_factors(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = bf16_folder(tmp_path / "dense", "llama", rope_parameters=rope)
    ref = export_gguf(load_model(str(folder)), tmp_path / "memory.gguf", progress=False)
    got = export_gguf(str(folder), tmp_path / "streamed.gguf", progress=False)
    assert got.streamed and not ref.streamed and got.arch == "llama"
    assert got.path.read_bytes() == ref.path.read_bytes()
    import gguf

    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(got.path)).tensors}


def _folder(path: Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors, json.loads((path / "config.json").read_text()), sorted(p.name for p in path.iterdir())


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_streamed_vllm_folder_equals_the_in_memory_one_tensor_for_tensor(case, tmp_path):
    ref = export_vllm(case.lm, tmp_path / "memory")
    want = _folder(ref.path)
    assert ref.layout == ("decilm" if len(set(case.widths)) > 1 else case.lm.model.config.model_type)
    for name, kw in (("folder", {}), ("plan", {"plan": str(case.plan)})):
        model = case.pruned if name == "folder" else case.base
        rep = export_model(str(model), tmp_path / name, fmt="vllm", **kw)
        assert rep["streamed"] and rep["max_resident_layers"] == 1 and rep["layout"] == ref.layout
        tensors, config, files = _folder(tmp_path / name)
        _same_tensors(tensors, want[0])
        assert config == want[1] and files == sorted([*want[2], MANIFEST]), name  # export_model commits the folder
    if ref.layout != "decilm":  # a plain folder: what save_pretrained writes (in the checkpoint's bf16)
        copy.deepcopy(case.lm.model).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
        tensors, config, _ = _folder(tmp_path / "hf")
        _same_tensors(tensors, want[0])
        config.pop("quantization_config", None)
        assert config == want[1]


# -- memory ---------------------------------------------------------------------------------------------
def _layer(name: str) -> int | None:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def test_a_streamed_export_holds_at_most_two_decoder_layers(case, tmp_path, monkeypatch):
    """Counted three ways at every tensor read: the skeleton's resident layers (the reader); the layers
    read but not yet written (the writer keeps pace); the layers whose read memory is still alive
    (nothing is kept after writing: storages are tracked, so views and numpy arrays count)."""
    import gguf

    live: dict[int, int] = {}  # layer -> its read tensors whose memory is not freed yet
    seen = {"pending": 0, "live": 0}
    writes = {"n": 0}
    real = ExportSource.tensors

    def drop(layer: int) -> None:
        live[layer] -= 1
        if not live[layer]:
            del live[layer]

    def counted(self):
        names = [s.name for s in self.specs]
        for k, (name, t) in enumerate(real(self)):
            pending = {_layer(n) for n in names[writes["n"]:k]} - {None}
            seen["pending"] = max(seen["pending"], len(pending))
            seen["live"] = max(seen["live"], len(live))
            if (i := _layer(name)) is not None:
                live[i] = live.get(i, 0) + 1
                weakref.finalize(t.untyped_storage(), drop, i)
            yield name, t

    def counting(cls, method):
        original = getattr(cls, method)

        def write(self, *args, **kwargs):
            writes["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, write)

    monkeypatch.setattr(ExportSource, "tensors", counted)
    counting(gguf.GGUFWriter, "write_tensor_data")
    counting(ShardWriter, "write")
    src = open_source(str(case.base), plan=str(case.plan))
    kept = list(src.tensors())  # the instrument works: a consumer that keeps everything holds every layer
    assert seen["pending"] == seen["live"] == len(live) == len(case.widths)
    del kept
    assert not live
    for fmt, out in (("gguf", "m.gguf"), ("vllm", "v")):
        for model, kw in ((case.pruned, {}), (case.base, {"plan": str(case.plan)})):
            seen.update(pending=0, live=0)
            writes["n"] = 0
            rep = export_model(str(model), tmp_path / out, fmt=fmt, progress=False, **kw)
            assert rep["max_resident_layers"] <= 2, (fmt, model.name)
            assert seen["pending"] <= 2 and seen["live"] <= 2, (fmt, model.name, seen)
            assert not live


# -- failures: one clear line, nothing half-written --------------------------------------------------
def _fail_at_layer(monkeypatch, layer: int, error: BaseException):
    """Reading layer `layer` from the shards raises `error`."""
    real = Checkpoint.read

    def read(self, names, **kw):
        names = list(names)
        if any(f".layers.{layer}." in n for n in names):
            raise error
        return real(self, names, **kw)

    monkeypatch.setattr(Checkpoint, "read", read)


def _fail_on_write(monkeypatch, cls, method: str, n: int, error: BaseException):
    """The writer's n-th tensor raises `error` (a kill, a full disk) while a layer is loaded."""
    real = getattr(cls, method)
    calls = {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, write)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", ["gguf", "vllm"])
def test_an_interrupted_export_keeps_the_previous_output_and_leaves_no_temp_file(case, tmp_path, monkeypatch, fmt):
    import gguf

    out = tmp_path / ("m.gguf" if fmt == "gguf" else "v")
    export_model(str(case.pruned), out, fmt=fmt, progress=False)
    before = out.read_bytes() if fmt == "gguf" else _folder(out)
    cls, method = (gguf.GGUFWriter, "write_tensor_data") if fmt == "gguf" else (ShardWriter, "write")
    _fail_on_write(monkeypatch, cls, method, 20, KeyboardInterrupt())  # killed halfway through the layers
    src = open_source(str(case.base), plan=str(case.plan))
    with pytest.raises(KeyboardInterrupt):
        if fmt == "gguf":
            export_gguf(src, out, progress=False)
        else:
            export_vllm(src, out)
    assert src.stream.loader.resident_max == 1
    assert src.stream.loader.resident_layers() == 0  # the layer being written was freed on the way out
    if fmt == "gguf":
        assert out.read_bytes() == before
    else:
        tensors, config, files = _folder(out)
        _same_tensors(tensors, before[0])
        assert (config, files) == before[1:]
    assert not _leftovers(tmp_path)


def test_a_full_disk_or_a_bad_shard_is_one_line(case, tmp_path, monkeypatch, capsys):
    import gguf

    with monkeypatch.context() as m:
        _fail_on_write(m, gguf.GGUFWriter, "write_tensor_data", 5, OSError(errno.ENOSPC, "No space left on device"))
        one_line_error(["export", "--model", str(case.pruned), "--out", str(tmp_path / "m.gguf")], capsys,
                        "disk filled up", "partial files were removed")
    with monkeypatch.context() as m:
        _fail_on_write(m, ShardWriter, "write", 5, OSError(errno.ENOSPC, "No space left on device"))
        one_line_error(["export", "--model", str(case.base), "--plan", str(case.plan), "--format", "vllm",
                         "--out", str(tmp_path / "v")], capsys, "disk filled up", "partial files were removed")
    with monkeypatch.context() as m:
        _fail_at_layer(m, 2, ModelError("reading shard x failed (bad bytes): the shard is damaged; download the "
                                        "checkpoint again"))
        one_line_error(["export", "--model", str(case.base), "--plan", str(case.plan), "--out",
                         str(tmp_path / "p.gguf")], capsys, "download the checkpoint again")
    assert not list(tmp_path.iterdir())


def test_bad_pruned_folders_are_refused_before_writing(case, tmp_path, capsys):
    one_line_error(["export", "--model", str(case.pruned), "--plan", str(case.plan), "--out",
                     str(tmp_path / "x.gguf")], capsys, "already pruned", "without --plan")
    # a shard whose tensor no longer has the recorded shape
    import shutil

    bad = Path(shutil.copytree(case.pruned, tmp_path / "bad"))
    ckpt = Checkpoint.open(bad)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = bad / ckpt.tensors[name].file
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="prune again"):
        export_model(str(bad), tmp_path / "x.gguf", progress=False)
    one_line_error(["export", "--model", str(bad), "--format", "vllm", "--out", str(tmp_path / "v")], capsys,
                    "down_proj", "prune again")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "v").exists()
    assert not _leftovers(tmp_path)


def test_an_offloaded_model_in_memory_is_refused_in_one_line(tmp_path):
    from conftest import make_loaded

    lm = make_loaded("llama")
    lm.model.model.layers[2].mlp.to("meta")  # what accelerate's offload leaves in the module
    with pytest.raises(ModelError, match="offloaded"):
        export_vllm(lm, tmp_path / "v")
    assert not list(tmp_path.iterdir())

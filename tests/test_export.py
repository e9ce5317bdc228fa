"""GGUF and vLLM exports of tiny pruned models, checked against independent readers: transformers'
GGUF loader, the gguf package's reader and dequantiser, llama.cpp itself (when the llamacpp extra is
installed), and a rebuild of the DeciLM layout the way vLLM's loader builds it."""

import json

import numpy as np
import pytest
import torch
from conftest import make_loaded, plan_for, tiny_folder

from seap import PruneConfig
from seap.cli import main
from seap.errors import ConfigError, ModelError
from seap.export import GGUFConfig, export_gguf, export_vllm
from seap.export.llamacpp import available as llamacpp_available
from seap.model.loading import load_model
from seap.pruning.surgery import slice_model

IDS = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(3))
needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="the llamacpp extra (llama-cpp-python) is "
                                    "not installed: pip install 'seap[llamacpp]'")


def pruned(tmp_path, family="llama", method="seap", ratio=0.5, **kw):
    """A tiny model with a real byte-level tokenizer, pruned in memory."""
    model_kw = {"opt": {}, "llama": {"intermediate_size": 64},
                # Gemma 3 checkpoints scale attention by 1/sqrt(head_dim): so must the tiny one, as llama.cpp does
                "gemma3": {"intermediate_size": 64, "query_pre_attn_scalar": 8}}[family]
    lm = load_model(str(tiny_folder(tmp_path, family, merges=True, **model_kw)))
    protect = kw.pop("protect", 0 if method in ("wanda-sp", "magnitude") else 1)  # uniform: one width everywhere
    cfg = PruneConfig.from_method(method, ratio=ratio, protect_first=protect, protect_last=protect, **kw)
    plan, _ = plan_for(lm, cfg, heads=family == "opt" or cfg.score.heads == "kv_groups")
    slice_model(lm.model, lm.adapter, plan)
    return lm


def widths(lm):
    return [lm.adapter.d_ff(layer) for layer in lm.adapter.layers(lm.model)]


def gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def test_uniform_llama_gguf_reloads_in_transformers_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = pruned(tmp_path, method="wanda-sp")
    assert len(set(widths(lm))) == 1 and widths(lm)[0] < 64
    res = export_gguf(lm, tmp_path / "out" / "m.gguf", progress=False)
    assert res.arch == "llama" and res.tensor_types == {"F32": res.n_tensors}
    # transformers' own GGUF reader undoes llama.cpp's q/k layout: an independent round trip.
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, lm.model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_per_layer_widths_are_written_as_deci_arrays(tmp_path):
    lm = pruned(tmp_path)
    w = widths(lm)
    assert len(set(w)) > 1
    res = export_gguf(lm, tmp_path / "d.gguf", progress=False)
    reader, fields = gguf_fields(res.path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == w
    assert fields["deci.block_count"] == len(w)
    assert fields["deci.attention.head_count"] == 4 and fields["deci.attention.head_count_kv"] == 2
    tensors = {t.name: t for t in reader.tensors}
    layers = lm.adapter.layers(lm.model)
    for i, layer in enumerate(layers):
        down = tensors[f"blk.{i}.ffn_down.weight"]
        assert list(down.shape) == [w[i], 32]  # ggml order: columns (the width) first
        np.testing.assert_array_equal(np.asarray(down.data), layer.mlp.down_proj.weight.detach().numpy())
        # q rows: llama.cpp pairs (x0, x_d/2), (x1, x_d/2+1), ... inside each head
        q = np.asarray(tensors[f"blk.{i}.attn_q.weight"].data)
        hf = layer.self_attn.q_proj.weight.detach().numpy().reshape(4, 8, 32)
        want = np.stack([hf[:, :4], hf[:, 4:]], axis=2).reshape(32, 32)
        np.testing.assert_array_equal(q, want)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 260
    assert fields["tokenizer.ggml.merges"] == ["Ġ t", "e r"]


def test_q8_0_quantises_what_it_can_and_dequantises_close(tmp_path):
    import gguf

    lm = pruned(tmp_path, method="seap", multiple=8)
    res = export_gguf(lm, tmp_path / "q.gguf", GGUFConfig(out_type="q8_0"), progress=False)
    reader, _ = gguf_fields(res.path)
    sd = lm.model.state_dict()
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":  # 32 columns: Q8_0 blocks of 32
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            ref = sd["model.layers.0.mlp.up_proj.weight"].numpy()
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
            assert np.abs(got - ref).max() <= np.abs(ref).max() / 127 + 1e-6
        elif len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay F32
        elif t.name.endswith("ffn_down.weight") and int(t.shape[0]) % 32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16  # rows not a multiple of 32: no Q8_0


def test_gemma3_exports_uniform_widths_with_llama_cpp_norms(tmp_path):
    lm = pruned(tmp_path, family="gemma3", method="wanda-sp")
    res = export_gguf(lm, tmp_path / "g.gguf", progress=False)
    reader, fields = gguf_fields(res.path)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 16
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    want = lm.model.model.layers[0].input_layernorm.weight.detach().numpy() + 1.0  # Gemma scales by (1 + w)
    np.testing.assert_allclose(np.asarray(norm.data), want)
    with pytest.raises(ModelError, match="uniform"):
        export_gguf(pruned(tmp_path / "b", family="gemma3"), tmp_path / "g2.gguf", progress=False)
    flap = pruned(tmp_path / "c", family="gemma3", method="flap", allocation="uniform", protect=0)
    with pytest.raises(ModelError, match="bias"):
        export_gguf(flap, tmp_path / "g3.gguf", progress=False)


def test_unsupported_family_and_bad_output_are_refused(tmp_path):
    lm = pruned(tmp_path, family="opt", method="magnitude")
    with pytest.raises(ModelError, match="not 'opt'"):
        export_gguf(lm, tmp_path / "o.gguf", progress=False)
    with pytest.raises(ConfigError, match=".gguf"):
        export_gguf(lm, tmp_path / "o.bin", progress=False)
    with pytest.raises(ConfigError, match="GGUF type"):
        GGUFConfig(out_type="q3")
    with pytest.raises(ModelError, match="query_pre_attn_scalar"):  # tiny Gemma 3 default: 256, head_dim 8
        export_gguf(make_loaded("gemma3"), tmp_path / "g.gguf", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


# -- llama.cpp --------------------------------------------------------------------------------------
@needs_llamacpp
@pytest.mark.parametrize("family,method,arch", [("llama", "seap", "deci"), ("llama", "wanda-sp", "llama"),
                                                ("gemma3", "wanda-sp", "gemma3")])
def test_llama_cpp_loads_the_export_with_the_same_logits(tmp_path, family, method, arch):
    from seap.export.llamacpp import compare_logits

    lm = pruned(tmp_path, family=family, method=method)
    res = export_gguf(lm, tmp_path / "m.gguf", progress=False)
    assert res.arch == arch
    agree = compare_logits(lm.model, res.path, IDS[0].tolist())
    assert agree.top1_agreement == 1.0
    assert agree.max_abs_diff < 1e-3 * max(1.0, agree.max_abs_logit)


@needs_llamacpp
def test_bench_llamacpp_times_dense_and_pruned_gguf(tmp_path):
    from seap.export.llamacpp import bench_gguf, speed_rows

    lm = pruned(tmp_path)
    dense = load_model(str(tmp_path / "tiny-llama"))
    paths = {"dense": export_gguf(dense, tmp_path / "dense.gguf", progress=False).path,
             "pruned": export_gguf(lm, tmp_path / "pruned.gguf", progress=False).path}
    rows = speed_rows(bench_gguf(paths, prompt_len=8, gen_len=4, warmup=0, repeats=2))
    assert [r["model"] for r in rows] == ["dense", "pruned"]
    assert rows[0]["decode_ratio"] == 1.0 and all(len(r["decode_runs"]) == 2 for r in rows)
    assert rows[1]["bytes_limit"] == pytest.approx(paths["dense"].stat().st_size / paths["pruned"].stat().st_size)


# -- vLLM ----------------------------------------------------------------------------------------------
def _vllm_style_rebuild(folder):
    """What vLLM's DeciLMForCausalLM builds from the folder, in transformers modules: each layer's
    MLP width from block_configs[i].ffn.intermediate_size, KV heads from n_heads_in_group."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("block_configs", "auto_map", "architectures")}
    base["model_type"] = "llama"
    model = LlamaForCausalLM(LlamaConfig(**base)).eval()
    for layer, block in zip(model.model.layers, cfg.block_configs):
        assert not hasattr(block.ffn, "ffn_mult")  # vLLM would round ffn_mult up to a multiple of 256
        layer.mlp = LlamaMLP(LlamaConfig(**{**base, "intermediate_size": block.ffn.intermediate_size}))
        assert cfg.num_attention_heads % block.attention.n_heads_in_group == 0
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return cfg, model.eval()


def test_vllm_folder_matches_the_decilm_layout(tmp_path):
    lm = pruned(tmp_path)
    res = export_vllm(lm, tmp_path / "v", tensor_parallel=2 if all(w % 2 == 0 for w in widths(lm)) else 1)
    assert res.layout == "decilm"
    data = json.loads((tmp_path / "v" / "config.json").read_text())
    assert data["architectures"] == ["DeciLMForCausalLM"] and data["model_type"] == "nemotron-nas"
    assert [b["ffn"]["intermediate_size"] for b in data["block_configs"]] == widths(lm)
    cfg, rebuilt = _vllm_style_rebuild(tmp_path / "v")
    assert type(cfg).__name__ == "DeciLMConfig" and cfg.block_configs[0].attention.n_heads_in_group == 2
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(IDS).logits, lm.model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_vllm_uniform_is_a_plain_folder_and_tensor_parallel_is_checked(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = pruned(tmp_path, method="wanda-sp", multiple=8)
    res = export_vllm(lm, tmp_path / "u", tensor_parallel=2)
    assert res.layout == "llama" and not (tmp_path / "u" / "configuration_decilm.py").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, lm.model(IDS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="--multiple 3"):
        export_vllm(lm, tmp_path / "u3", tensor_parallel=3)
    assert not (tmp_path / "u3").exists()


def test_vllm_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ModelError, match="query heads"):
        export_vllm(pruned(tmp_path, heads="kv_groups"), tmp_path / "kv")
    with pytest.raises(ModelError, match="no vLLM layout"):
        export_vllm(pruned(tmp_path / "g", family="gemma3"), tmp_path / "g3")


def test_export_cli(tmp_path, capsys):
    folder = str(tiny_folder(tmp_path / "dense", "llama"))
    assert main(["export", "--model", folder, "--out", str(tmp_path / "x.gguf")]) == 0
    assert "llama.cpp architecture llama" in capsys.readouterr().out
    assert main(["export", "--model", folder, "--format", "vllm", "--out", str(tmp_path / "vf")]) == 0
    assert "plain llama folder" in capsys.readouterr().out
    assert main(["export", "--model", folder, "--format", "vllm", "--check", "5", "--out", str(tmp_path / "c")]) == 2
    assert "--check" in capsys.readouterr().err

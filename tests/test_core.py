"""Exact-equivalence checks on tiny random models of every adapter family."""

import copy

import pytest
import torch
from conftest import TEXTS, make_loaded, plan_for

from seap import PruneConfig
from seap.calibration.layerwise import collect_stats
from seap.calibration.stats import ActivationStats, ChannelStats
from seap.model.fingerprints import fingerprint
from seap.model.pruned_folder import load_pruned, save_pruned
from seap.pruning.plan import Expert, Plan, PlanRecord
from seap.pruning.surgery import masked, slice_model

IDS = torch.randint(2, 128, (3, 17), generator=torch.Generator().manual_seed(1))


def keep_all_plan(lm):
    layers = lm.adapter.layers(lm.model)
    g = lm.adapter.head_geometry(layers[0])
    ex = Expert([torch.arange(lm.adapter.d_ff(l)) for l in layers],
                [torch.arange(g.num_heads) for _ in layers] if not g.is_gqa else None, stats={"achieved_ratio": 0.0})
    meta = PlanRecord(base_model="tiny", fingerprint=fingerprint(lm.model, lm.adapter), method="none", config={},
                      target_ratio=0.0, tasks=["all"], head_unit=None if g.is_gqa else "heads")
    return Plan(meta, {"all": ex})


def test_keep_all_plan_is_the_dense_model(family):
    lm = make_loaded(family)
    dense = lm.model(IDS).logits
    slice_model(lm.model, lm.adapter, keep_all_plan(lm))
    assert torch.equal(lm.model(IDS).logits, dense)


CASES = [("seap", {}), ("seap-gen", {}), ("wanda-sp", {}), ("flap", {}), ("magnitude", {}), ("random", {}),
         ("seap", {"multiple": 8}), ("wanda-sp", {"heads": "none"})]


@pytest.mark.parametrize("method,extra", CASES, ids=[f"{m}-{'-'.join(map(str, e.values()))}" for m, e in CASES])
def test_sliced_equals_masked(family, method, extra):
    lm = make_loaded(family)
    cfg = PruneConfig.from_method(method, ratio=0.5, protect_first=1, protect_last=1, **extra)
    plan, _ = plan_for(lm, cfg)
    with masked(lm.model, lm.adapter, plan):
        ref = lm.model(IDS).logits
    dense = lm.model(IDS).logits
    assert not torch.allclose(ref, dense)  # the plan did something
    slice_model(lm.model, lm.adapter, plan)
    torch.testing.assert_close(lm.model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_kv_group_pruning_on_gqa_equals_masked():
    lm = make_loaded("llama", num_attention_heads=4, num_key_value_heads=2)
    plan, _ = plan_for(lm, PruneConfig.from_method("flap", ratio=0.3, heads="kv_groups"), heads=True)
    assert plan.head_unit == "kv_groups"
    with masked(lm.model, lm.adapter, plan):
        ref = lm.model(IDS).logits
    slice_model(lm.model, lm.adapter, plan)
    torch.testing.assert_close(lm.model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_two_halves_merged_equal_one_pass(tokenizer):
    lm = make_loaded("llama")
    kw = dict(heads=True, meta={"fingerprint": {"x": 1}}, progress=False, batch_size=3)
    whole = collect_stats(lm.model, tokenizer, lm.adapter, TEXTS, **kw)
    a = collect_stats(lm.model, tokenizer, lm.adapter, TEXTS[:5], **kw)
    b = collect_stats(lm.model, tokenizer, lm.adapter, TEXTS[5:], **kw)
    merged = a.merge(b)
    # Independent computation: one block of all real tokens, no streaming.
    assert merged.n_tokens == whole.n_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    for got, ref in zip(merged.ffn + merged.attn, whole.ffn + whole.attn):
        for f in ("mean", "m2", "sumsq"):
            # float32 forwards of differently padded batches differ in the last bits only
                torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-6, atol=1e-7)


def test_streaming_matches_direct_statistics_and_ignores_padding(tokenizer):
    lm = make_loaded("llama")
    captured = []
    h = lm.adapter.ffn_out(lm.adapter.layers(lm.model)[2]).register_forward_pre_hook(
        lambda m, a: captured.append(a[0][0].detach().clone()))
    for t in TEXTS:  # batch size 1: no padding at all
        lm.model(torch.tensor([tokenizer.encode(t)]))
    h.remove()
    z = torch.cat(captured).double()
    stats = collect_stats(lm.model, tokenizer, lm.adapter, TEXTS, progress=False, batch_size=4).ffn[2]
    assert stats.count == len(z)
    torch.testing.assert_close(stats.mean, z.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.var, z.var(0, unbiased=False), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.sumsq, (z * z).sum(0), rtol=1e-6, atol=1e-6)


def test_chan_merge_matches_welford_on_random_blocks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 7, generator=g, dtype=torch.float64) * 3 + 5
    s = ChannelStats.empty(7)
    for chunk in torch.split(x, [1, 30, 0, 50, 20]):
        s = s.merge(ChannelStats.of(chunk))
    torch.testing.assert_close(s.var, x.var(0, unbiased=False))
    torch.testing.assert_close(s.mean, x.mean(0))


def test_bias_compensation_keeps_mean_layer_output(family):
    lm = make_loaded(family)
    plan, stats = plan_for(lm, PruneConfig.from_method("flap", ratio=0.5, heads="none"))
    layers = lm.adapter.layers(lm.model)
    target = 3
    # Prune one layer only, so its inputs are the dense model's inputs.
    ex = plan.experts["t"]
    for i, layer in enumerate(layers):
        if i != target:
            ex.ffn[i] = torch.arange(lm.adapter.d_ff(layer))
            ex.ffn_bias[i] = torch.zeros_like(ex.ffn_bias[i])
    assert len(ex.ffn[target]) < lm.adapter.d_ff(layers[target])

    def mean_output(model):
        outs = []
        lin = lm.adapter.ffn_out(lm.adapter.layers(model)[target])
        h = lin.register_forward_hook(lambda m, a, o: outs.append(o.reshape(-1, o.shape[-1]).detach()))
        for t in TEXTS:
            model(torch.tensor([lm.tokenizer.encode(t)]))
        h.remove()
        return torch.cat(outs).double().mean(0)

    dense = mean_output(lm.model)
    pruned = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")
    err = (mean_output(pruned) - dense).abs().max()
    plan.experts["t"].ffn_bias = None  # without compensation the mean drifts
    plain = slice_model(copy.deepcopy(lm.model), lm.adapter, plan, "t")
    drift = (mean_output(plain) - dense).abs().max()
    assert err < 1e-6 * max(1.0, float(dense.abs().max())) * 10
    assert drift > 100 * err


@pytest.mark.parametrize("allocation", ["uniform", "logistic"])
def test_save_reload_round_trip(tmp_path, family, allocation):
    lm = make_loaded(family)
    method = "flap" if family != "gemma3" else "seap"
    protect = 1 if allocation == "logistic" else 0
    cfg = PruneConfig.from_method(method, ratio=0.4, allocation=allocation, protect_first=protect,
                                  protect_last=protect)
    plan, _ = plan_for(lm, cfg)
    slice_model(lm.model, lm.adapter, plan)
    widths = [lm.adapter.d_ff(l) for l in lm.adapter.layers(lm.model)]
    assert (len(set(widths)) > 1) == (allocation == "logistic")
    ref = lm.model(IDS).logits
    save_pruned(lm.model, lm.tokenizer, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert torch.equal(again(IDS).logits, ref)


def test_uniform_widths_reload_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_loaded("llama")
    plan, _ = plan_for(lm, PruneConfig.from_method("wanda-sp", ratio=0.5))
    slice_model(lm.model, lm.adapter, plan)
    ref = lm.model(IDS).logits
    save_pruned(lm.model, lm.tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.config.intermediate_size == 32
    assert torch.equal(plain(IDS).logits, ref)


def test_per_layer_widths_refuse_a_plain_load(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_loaded("llama")
    plan, _ = plan_for(lm, PruneConfig.from_method("seap", ratio=0.5, protect_first=1, protect_last=1))
    slice_model(lm.model, lm.adapter, plan)
    save_pruned(lm.model, lm.tokenizer, tmp_path / "m")
    with pytest.raises(Exception):  # transformers refuses the heterogeneous config, no silent misload
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_same_seed_same_plan():
    def indices(seed, method):
        lm = make_loaded("llama")
        plan, _ = plan_for(lm, PruneConfig.from_method(method, ratio=0.5, seed=seed, protect_first=1, protect_last=1))
        return [t.tolist() for t in plan.experts["t"].ffn]

    assert indices(3, "random") == indices(3, "random")
    assert indices(3, "random") != indices(4, "random")
    assert indices(0, "seap") == indices(0, "seap")


def test_plan_and_stats_persist_exactly(tmp_path):
    lm = make_loaded("opt")
    plan, stats = plan_for(lm, PruneConfig.from_method("flap", ratio=0.5))
    plan.save(tmp_path / "plan")
    again = Plan.load(tmp_path / "plan")
    for name, ex in plan.experts.items():
        for kind in ("ffn", "heads", "ffn_bias", "attn_bias"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(ex, kind), getattr(again.experts[name], kind)))
    stats.meta["fingerprint"] = {"x": 1}
    stats.save(tmp_path / "s.safetensors")
    s2 = ActivationStats.load(tmp_path / "s.safetensors")
    assert s2.n_tokens == stats.n_tokens and torch.equal(s2.attn[1].m2, stats.attn[1].m2)

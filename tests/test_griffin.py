"""GRIFFIN on tiny models of every family: dense at density 1, batches equal to each prompt alone,
and the statistic and the pruned steps against independent computations."""

import copy

import pytest
import torch
from conftest import left_padded, make_loaded, padded_decode

from seap.core.scores import top_k
from seap.errors import ConfigError
from seap.inference.decoding import greedy
from seap.inference.griffin import (GriffinConfig, GriffinSelection, classification_mode, corpus_statistic, keep_count,
                          neuron_scores, prefill_statistics, select, with_prior)

G = torch.Generator().manual_seed(5)
SEQS = [torch.randint(2, 128, (n,), generator=G) for n in (13, 7, 10, 4)]



def test_density_one_reproduces_dense_greedy_generation(family):
    lm = make_loaded(family)
    ids, mask = left_padded(SEQS)
    out = greedy(lm.model, ids, 10, attention_mask=mask, selection=GriffinSelection(lm.adapter, 1.0))
    ref = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out.tokens, ref[:, ids.shape[1]:])
    assert out.stats["union_fraction"] == out.stats["kept_fraction"] == 1.0


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_left_padded_batch_of_four_equals_each_prompt_alone(family, density):
    lm = make_loaded(family)
    ids, mask = left_padded(SEQS)
    sel = GriffinSelection(lm.adapter, density)
    out = greedy(lm.model, ids, 10, attention_mask=mask, selection=sel)
    for r, s in enumerate(SEQS):
        alone = greedy(lm.model, s[None], 10, selection=sel)
        assert torch.equal(out.tokens[r], alone.tokens[0])
    assert out.stats["kept_fraction"] == pytest.approx(density, abs=0.02)
    # the batch shares one union, smaller than dense
    assert out.stats["kept_fraction"] <= out.stats["union_fraction"] < 1.0


def test_statistic_matches_its_definition_and_ignores_padding():
    z = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([sum((z[0, t, j] / z[0, t].norm()) ** 2 for t in range(6)) ** 0.5 for j in range(16)])
    torch.testing.assert_close(neuron_scores(z)[0], want)
    padded = torch.cat([torch.full((1, 3, 16), 1e3), z], dim=1)  # garbage under the padding
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(neuron_scores(padded, mask), neuron_scores(z))
    assert top_k(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2).tolist() == [[1, 3]]
    assert keep_count(0.5, 1536) == 768 and keep_count(1e-6, 10) == 1
    with pytest.raises(ConfigError, match="density"):
        GriffinConfig(density=0.0)


def _zero_outside(adapter, model, keep):
    """Hooks that zero each layer's down-projection input outside `keep[layer]` (an independent path)."""
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        def hook(_m, args, i=i):
            m = torch.zeros(args[0].shape[-1], dtype=args[0].dtype)
            m[keep[i]] = 1
            return (args[0] * m,)
        handles.append(adapter.ffn_out(layer).register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def test_pruned_decode_step_equals_zeroing_the_unselected_neurons(family):
    from seap.inference.griffin import experts_applied

    lm = make_loaded(family)
    model, adapter, ids = lm.model, lm.adapter, SEQS[0][None]
    with prefill_statistics(model, adapter, None) as scores:
        out = model(ids, use_cache=True)
    sel = select(scores, 0.5)
    nxt = out.logits[:, -1:].argmax(-1)
    cache_copy = copy.deepcopy(out.past_key_values)
    with experts_applied(model, adapter, sel, 1):
        got = model(nxt, past_key_values=out.past_key_values).logits
    handles = _zero_outside(adapter, model, [top_k(s, keep_count(0.5, s.shape[-1]))[0] for s in scores])
    try:
        want = model(nxt, past_key_values=cache_copy).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(nxt, past_key_values=copy.deepcopy(cache_copy)).logits)


def test_classification_mode_prunes_only_the_last_token():
    lm = make_loaded("llama")
    model, adapter = lm.model, lm.adapter
    ids = SEQS[0][None]
    dense = model(ids).logits
    with classification_mode(model, adapter, 0.5):
        got = model(ids).logits
    torch.testing.assert_close(got[:, :-1], dense[:, :-1])
    # Independent: statistic from all tokens but the last, then the last token masked.
    with prefill_statistics(model, adapter, torch.tensor([[1] * (len(SEQS[0]) - 1) + [0]])) as scores:
        model(ids)
    keep = [top_k(s, keep_count(0.5, s.shape[-1]))[0] for s in scores]
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        def hook(_m, args, i=i):
            z = args[0].clone()
            m = torch.zeros(z.shape[-1])
            m[keep[i]] = 1
            z[:, -1] = z[:, -1] * m
            return (z,)
        handles.append(adapter.ffn_out(layer).register_forward_pre_hook(hook))
    try:
        want = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[:, -1], dense[:, -1])


def test_shared_batch_experts_are_the_top_k_of_the_pooled_unit_scores():
    s = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) + torch.tensor([[0.0], [5.0], [0.0]])
    k = keep_count(0.25, 20)
    pooled = [sum((s[b, j] / s[b].norm()) ** 2 for b in range(3)) ** 0.5 for j in range(20)]  # by hand
    want = sorted(sorted(range(20), key=lambda j: -float(pooled[j]))[:k])
    sel = select([s], 0.25, shared=True)
    assert sel.union[0].tolist() == want and sel.member[0] is None and sel.union_fraction == k / 20
    # one prompt: the shared expert is that prompt's own
    assert torch.equal(select([s[:1]], 0.25, shared=True).union[0], select([s[:1]], 0.25).union[0])
    with pytest.raises(ConfigError, match="classification"):
        GriffinConfig(shared=True, mode="class")


@torch.no_grad()
def test_shared_batch_decode_equals_zeroing_outside_the_pooled_expert(family):
    from seap.inference.decoding import positions
    from seap.inference.griffin import pooled_scores

    lm = make_loaded(family)
    model, adapter = lm.model, lm.adapter
    ids, mask = left_padded(SEQS)
    shared = GriffinSelection(adapter, GriffinConfig(density=0.5, shared=True, short="none"))
    got = greedy(model, ids, 8, attention_mask=mask, selection=shared)
    assert got.stats["union_fraction"] == got.stats["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    # Independent path: dense prefill, the pooled top k, then decode steps with hooks zeroing the rest.
    pos = positions(mask)
    with prefill_statistics(model, adapter, mask) as scores:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    keep = [top_k(pooled_scores(s), keep_count(0.5, s.shape[-1]))[0] for s in scores]
    assert torch.equal(got.tokens, padded_decode(model, out, mask, pos, 7, _zero_outside(adapter, model, keep)))


# -- short prompts: the prior and the density fix ---------------------------------------------------
def test_prior_weighs_like_n0_tokens_of_evidence():
    s = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(torch.randn(16, generator=torch.Generator().manual_seed(2)), 0)
    got = with_prior(s, p, 64.0)
    torch.testing.assert_close(got, (s.square() + 64 * p).sqrt())
    torch.testing.assert_close(with_prior(s, p, 0.0), s)
    # a long prompt's own ranking wins, a one-token prompt's ranking is the prior's
    z = torch.randn(1, 4000, 16, generator=torch.Generator().manual_seed(3))
    long = neuron_scores(z)
    assert torch.equal(top_k(with_prior(long, p, 1.0), 8), top_k(long, 8))
    assert torch.equal(top_k(with_prior(neuron_scores(z[:, :1]), p, 1e6), 8), top_k(p[None], 8))


def test_the_prior_from_the_engine_is_the_whole_model_statistic(family, tmp_path):
    """corpus_statistic runs on the calibration engine, in memory and streamed from a checkpoint alike;
    both equal the statistic summed over whole-model forwards of each text alone."""
    from conftest import tiny_folder

    from seap import Runtime
    from seap.model.loading import open_model

    texts = ["some generic text", "and a second one, longer than the first", "a third"]
    folder = tiny_folder(tmp_path, family)
    lm = open_model(str(folder), Runtime(device="cpu", dtype="float32"))
    total, n = None, 0
    for t in texts:
        ids = lm.tokenizer(t, return_tensors="pt")["input_ids"]
        with prefill_statistics(lm.model, lm.adapter, None) as scores:
            lm.model(ids)
        sq = [s.double().square().sum(0) for s in scores]
        total = sq if total is None else [a + b for a, b in zip(total, sq)]
        n += ids.shape[1]
    want = [(t / n).float() for t in total]
    lazy = open_model(str(folder), Runtime(device="cpu", dtype="float32", load="layerwise"), streamable=True)
    assert type(lazy).__name__ == "LazyModel"
    for got in (corpus_statistic(lm, texts, batch_size=2),
                corpus_statistic(lazy, texts)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_density_fix_keeps_more_of_a_short_prompt_and_selects_per_row():
    cfg = GriffinConfig(density=0.5, short="density", prior_tokens=64)
    d = cfg.densities(torch.tensor([0, 64, 10_000]))
    assert d[0] == 1.0 and d[1] == pytest.approx(0.75) and d[2] == pytest.approx(0.5, abs=0.004)
    s = torch.rand(3, 40, generator=torch.Generator().manual_seed(4))
    sel = select([s], torch.tensor([1.0, 0.5, 0.25]))
    rows = [set(sel.union[0][sel.member[0][r]].tolist()) for r in range(3)]
    assert [len(r) for r in rows] == [40, 20, 10]
    for r, k in ((1, 20), (2, 10)):
        assert rows[r] == set(top_k(s[r:r + 1], k)[0].tolist())
    assert sel.kept[0] == pytest.approx((40 + 20 + 10) / 3)
    assert GriffinConfig(density=0.5, short="none").densities(torch.tensor([3]))[0] == 0.5


def test_the_prior_fix_decodes_through_the_combined_top_k(family):
    lm = make_loaded(family)
    model, adapter, ids = lm.model, lm.adapter, SEQS[3][None]  # a 4-token prompt
    prior = corpus_statistic(lm, ["some generic text", "and a second one, longer than the first"])
    assert all(float(p.sum()) == pytest.approx(1.0, rel=1e-5) for p in prior)  # per-token shares
    cfg = GriffinConfig(density=0.5, short="prior", prior_tokens=32)
    out = greedy(model, ids, 2, selection=GriffinSelection(adapter, cfg, prior))
    with prefill_statistics(model, adapter, None) as scores:
        dense = model(ids, use_cache=True)
    first = dense.logits[:, -1:].argmax(-1)
    keep = [top_k(with_prior(s, p, 32), keep_count(0.5, s.shape[-1]))[0] for s, p in zip(scores, prior)]
    pure = [top_k(s, keep_count(0.5, s.shape[-1]))[0] for s in scores]
    assert any(not torch.equal(a, b) for a, b in zip(keep, pure))  # the prior changes this prompt's experts
    handles = _zero_outside(adapter, model, keep)
    try:
        second = model(first, past_key_values=dense.past_key_values).logits[:, -1:].argmax(-1)
    finally:
        for h in handles:
            h.remove()
    assert out.tokens.tolist() == [[first.item(), second.item()]]
    with pytest.raises(ConfigError, match="prior"):
        GriffinSelection(adapter, cfg)
    zero = greedy(model, ids, 6, selection=GriffinSelection(adapter, GriffinConfig(density=0.5, prior_tokens=0), prior))
    assert torch.equal(zero.tokens, greedy(model, ids, 6, selection=GriffinSelection(adapter, 0.5)).tokens)
    assert GriffinConfig(density=0.5).label == "griffin@0.5+density64"
    assert GriffinConfig(density=0.5, short="prior").label == "griffin@0.5+prior64"
    assert GriffinConfig(density=0.5, short="none").label == "griffin@0.5"

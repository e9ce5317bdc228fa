"""seap.inference.decoding.greedy, the one torch decode loop: token for token what generate(do_sample=False)
gives (padded and unpadded batches, eos padding), and with a GRIFFIN selection what the former
griffin_decode gave (its implementation is kept below as the reference) and what an independent
masked dense decode gives."""

import pytest
import torch
from conftest import left_padded, make_loaded, padded_decode, tiny_folder

from seap.errors import ConfigError
from seap.inference.decoding import cut_at_stop, generate_texts, greedy, positions
from seap.inference.griffin import (GriffinConfig, GriffinSelection, corpus_statistic, experts_applied, prefill_statistics,
                          select, with_prior)
from seap.model.loading import encode_left_padded, load_model

G = torch.Generator().manual_seed(11)
SEQS = [torch.randint(2, 128, (n,), generator=G) for n in (9, 5, 12, 3)]


def _generate(model, ids, mask, n, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def test_greedy_equals_generate_unpadded_and_padded(family):
    lm = make_loaded(family)
    ids = torch.randint(2, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    want = _generate(lm.model, ids, torch.ones_like(ids), 7, min_new_tokens=7, pad_token_id=0)
    out = greedy(lm.model, ids, 7)  # the lean path: no mask, no position ids
    assert torch.equal(out.tokens, want) and out.stats == {}
    assert torch.equal(greedy(lm.model, ids, 7, attention_mask=torch.ones_like(ids)).tokens, want)
    ids, mask = left_padded(SEQS)
    want = _generate(lm.model, ids, mask, 7, min_new_tokens=7, pad_token_id=0)
    assert torch.equal(greedy(lm.model, ids, 7, attention_mask=mask).tokens, want)


def test_eos_pads_done_rows_and_stops_as_generate_does(family):
    lm = make_loaded(family)
    ids, mask = left_padded(SEQS)
    free = greedy(lm.model, ids, 10, attention_mask=mask).tokens
    eos = [int(free[0, 2]), int(free[2, 5])]  # row 0 ends at its third token, row 2 at its sixth at the latest
    want = _generate(lm.model, ids, mask, 10, eos_token_id=eos, pad_token_id=0)
    got = greedy(lm.model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0).tokens
    assert torch.equal(got, want)
    assert (got[0, 3:] == 0).all()  # row 0 padded after its eos
    # every row done early: the loop stops there, as generate() does
    first = [int(t) for t in free[:, 0]]
    assert greedy(lm.model, ids, 10, attention_mask=mask, eos_token_id=first).tokens.shape == (4, 1)
    with pytest.raises(ConfigError, match="new tokens"):
        greedy(lm.model, ids, 0)


def test_text_generation_equals_generate_with_the_models_eos_and_stop_strings(tmp_path):
    lm = load_model(str(tiny_folder(tmp_path, "llama")))
    tok = lm.tokenizer
    prompts = ["The quick brown fox", "Question: why?", "A", "Numbers: 1 2 3 4 5 6"]
    enc = encode_left_padded(tok, prompts)
    free, _ = generate_texts(lm, prompts, 12)
    first = greedy(lm.model, enc["input_ids"], 1, attention_mask=enc["attention_mask"]).tokens[:, 0]
    # the generation config's end ids, as an instruct model lists its end of turn there (generate()
    # stops at them): rows 0 and 3 end at their first token, rows 1 and 2 run on
    lm.model.generation_config.eos_token_id = [int(first[0]), int(first[3])]

    def old(n: int) -> list[str]:  # what seap.inference.experts.greedy_batch returned (transformers' generate())
        out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    texts, out = generate_texts(lm, prompts, 12)
    assert texts == old(12) and len(texts[0]) < len(free[0]) and len(texts[3]) < len(free[3])
    assert (out.tokens[0, 1:] == tok.pad_token_id).all()  # done rows padded as generate() pads them
    stop = [texts[1][3:5], texts[2][6:7]]
    stopped, _ = generate_texts(lm, prompts, 12, stop=stop)
    assert stopped == [cut_at_stop(t, stop) for t in old(12)] and stopped != texts


# -- GRIFFIN ------------------------------------------------------------------------------------------
@torch.inference_mode()
def _griffin_decode(model, adapter, input_ids, new_tokens, attention_mask=None, density=0.5, eos_token_id=None,
                    finished=None, shared=False, prior=None) -> torch.Tensor:
    """The former seap.inference.griffin.griffin_decode (its tokens), verbatim but for timing and the output."""
    cfg = density if isinstance(density, GriffinConfig) else GriffinConfig(density=density, shared=shared,
                                                                           short="none")
    padded = attention_mask is not None
    mask = attention_mask if padded else torch.ones_like(input_ids)
    pos = positions(mask) if padded else None
    with prefill_statistics(model, adapter, mask) as scores:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1)
    if cfg.short == "prior" and not cfg.pure:
        scores = [with_prior(s, p, cfg.prior_tokens) for s, p in zip(scores, prior)]
    sel = select(scores, cfg.densities(mask.sum(-1)) if cfg.short == "density" else cfg.density, cfg.shared)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    cache, tokens = out.past_key_values, [nxt]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    last_pos = None if pos is None else pos[:, -1:]
    with experts_applied(model, adapter, sel, input_ids.shape[0]):
        for _ in range(new_tokens - 1):
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
            if finished is not None and (hit := finished(torch.cat(tokens, dim=1))) is not None:
                done |= hit.to(done.device)
            if bool(done.all()):
                break
            if padded:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
                last_pos = last_pos + 1
            out = model(input_ids=nxt, attention_mask=mask if padded else None, position_ids=last_pos,
                        past_key_values=cache, use_cache=True)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt = step if eos_token_id is None else torch.where(done[:, None], eos_token_id, step)
            cache = out.past_key_values
            tokens.append(nxt)
    return torch.cat(tokens, dim=1)


def test_griffin_selection_gives_the_former_griffin_decode_tokens(family):
    lm = make_loaded(family)
    model, adapter = lm.model, lm.adapter
    ids, mask = left_padded(SEQS)
    prior = corpus_statistic(lm, ["some generic text", "and a second one, longer than the first"])
    free = _griffin_decode(model, adapter, ids, 10, mask, density=0.5)
    eos = int(free[1, 3])
    stop_row2 = lambda toks: torch.tensor([False, False, toks.shape[1] >= 4, False])  # noqa: E731 - a stop string
    cases = [  # (config, padded, eos, finished)
        (0.5, True, None, None),
        (0.25, False, None, None),
        (GriffinConfig(density=0.5, shared=True, short="none"), True, None, None),
        (GriffinConfig(density=0.5), True, eos, stop_row2),  # the short-prompt density fix
        (GriffinConfig(density=0.5, short="prior", prior_tokens=32), True, eos, None),
        (GriffinConfig(density=0.5, short="prior", prior_tokens=32), False, None, None),
    ]
    for cfg, padded, eos_id, fin in cases:
        m = mask if padded else None
        x = ids if padded else torch.stack([s[:3] for s in SEQS])
        want = _griffin_decode(model, adapter, x, 10, m, density=cfg, eos_token_id=eos_id, finished=fin, prior=prior)
        sel = GriffinSelection(adapter, cfg, prior)
        got = greedy(model, x, 10, attention_mask=m, selection=sel, eos_token_id=eos_id, finished=fin)
        assert torch.equal(got.tokens, want), cfg
        assert 0 < got.stats["kept_fraction"] <= got.stats["union_fraction"] <= 1
    # the model is dense again after every decode
    assert torch.equal(greedy(model, ids, 10, attention_mask=mask).tokens,
                       _griffin_decode(model, adapter, ids, 10, mask, density=1.0))


@torch.no_grad()
def test_griffin_selection_equals_a_masked_dense_decode():
    """Independent of the gathered linears: the prefill's per-row top k, then dense decode steps
    whose down-projection inputs are zeroed outside each row's own expert."""
    lm = make_loaded("llama")
    model, adapter = lm.model, lm.adapter
    ids, mask = left_padded(SEQS)
    got = greedy(model, ids, 6, attention_mask=mask, selection=GriffinSelection(adapter, 0.5))
    pos = positions(mask)
    with prefill_statistics(model, adapter, mask) as scores:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    sel = select(scores, 0.5)
    keep = []  # [B, F] per layer: each row's own expert
    for u, m, w in zip(sel.union, sel.member, sel.widths):
        k = torch.zeros(ids.shape[0], w)
        k[:, u] = 1.0 if m is None else m.float()
        keep.append(k)
    handles = [adapter.ffn_out(layer).register_forward_pre_hook(lambda _m, a, i=i: (a[0] * keep[i][:, None, :],))
               for i, layer in enumerate(adapter.layers(model))]
    assert torch.equal(got.tokens, padded_decode(model, out, mask, pos, 5, handles))


def test_griffin_decode_needs_its_prefill_and_restores_the_model_on_error():
    lm = make_loaded("llama")
    sel = GriffinSelection(lm.adapter, 0.5)
    with pytest.raises(RuntimeError, match="prefill"):
        with sel.decode(lm.model):
            pass
    before = [type(lm.adapter.ffn_out(layer)) for layer in lm.adapter.layers(lm.model)]

    def boom(_tokens):
        raise KeyError("a stop test that fails")

    with pytest.raises(KeyError):
        greedy(lm.model, SEQS[0][None], 4, selection=sel, finished=boom)
    assert [type(lm.adapter.ffn_out(layer)) for layer in lm.adapter.layers(lm.model)] == before
    assert all(not lm.adapter.ffn_out(layer)._forward_pre_hooks for layer in lm.adapter.layers(lm.model))

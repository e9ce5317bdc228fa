"""The selective scorer gives HFLM's log-likelihoods and greedy flags (1e-5), on tiny models."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from seap.evaluation.harness import make_lm  # noqa: E402
from seap.evaluation.scorer import packed_mask, plan_rows  # noqa: E402
from seap.model.loading import load_model  # noqa: E402

from conftest import tiny_folder  # noqa: E402


def _requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "yes", "no"]
    reqs = []
    for i in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        cont = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        reqs.append(Instance("loglikelihood", {}, (ctx, cont), i))
        if i % 4 == 0:  # a yes/no question: one-token answers after the same context share one input row
            reqs += [Instance("loglikelihood", {}, (ctx, a), i) for a in ("y", "n")]
        if i % 3 == 0:  # a multiple-choice question: answers of several tokens after one context (packed)
            reqs += [Instance("loglikelihood", {}, (ctx, " " + " ".join(rng.choice(words) for _ in range(k))), i)
                     for k in (1, 2, 2, 5)]
    return reqs


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 16), ("gemma3", 128), ("opt", None)])
def test_selective_equals_hflm(family, window, tmp_path):
    # Gemma 3 with a 16-token window runs most requests unpacked (beyond the window), with 128 packed
    lm = load_model(str(tiny_folder(tmp_path, family, **({"sliding_window": window} if window else {}))))
    reqs = _requests(23)
    # max_length 32 makes the longest requests truncate from the left, as HFLM does
    for max_length in (None, 32):
        ref = make_lm(lm.model, lm.tokenizer, batch_size=4, max_length=max_length, exact=True)
        fast = make_lm(lm.model, lm.tokenizer, batch_size=4, max_length=max_length)
        assert type(fast).__name__ == "SelectiveHFLM"
        a = ref.loglikelihood(reqs, disable_tqdm=True)
        b = fast.loglikelihood(reqs, disable_tqdm=True)
        assert [g for _, g in a] == [g for _, g in b]
        # 1e-5, or two float32 steps of a long continuation's sum (the packed rows sum in another order)
        assert torch.allclose(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]), atol=1e-5, rtol=2e-7)
        # a rolling (perplexity) request reads every position: the same windows and sums
        text = " ".join(r.args[0] for r in reqs[:6])
        roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
        assert ref.loglikelihood_rolling(roll, disable_tqdm=True)[0] == pytest.approx(
            fast.loglikelihood_rolling(roll, disable_tqdm=True)[0], abs=1e-4)


def test_plan_rows_packs_shared_contexts_and_reads_hflm_positions():
    ctx, other = [5, 6, 7], [9, 9]
    reqs = [(ctx, [1]), (ctx, [2]), (ctx, [3, 4]), (ctx, [3, 8]), (ctx, [1, 2, 3]), (other, [4, 4]), (other, [4, 5])]
    rows = plan_rows(reqs, max_length=64, window=None, pack=True)
    packed, = [r for r in rows if r.packed]
    # the context once, then the distinct continuation inputs ([], [3], [1, 2]) at their own positions
    assert packed.tokens == [5, 6, 7, 3, 1, 2]
    assert packed.position == [0, 1, 2, 3, 3, 4]
    reads = dict(packed.reads)
    assert reads == {0: [2], 1: [2], 2: [2, 3], 3: [2, 3], 4: [2, 4, 5]}
    # one distinct continuation input after `other`: HFLM's own row, which both of its requests read
    plain, = [r for r in rows if not r.packed]
    assert plain.tokens == [9, 9, 4] and dict(plain.reads) == {5: [1, 2], 6: [1, 2]}
    # the mask: the segments see the context and themselves, not each other
    mask = packed_mask([packed, plain], 6, torch.float32)[:, 0] == 0
    assert mask[0, 5].tolist() == [True, True, True, False, True, True]
    assert mask[0, 3].tolist() == [True, True, True, True, False, False]
    assert mask[1, 2].tolist() == [True, True, True, False, False, False]
    # beyond the window, truncated, or packing off: HFLM's rows, one per distinct input
    for kw in ({"window": 3}, {"max_length": 3}, {"pack": False}):
        args = dict(max_length=64, window=None, pack=True) | kw
        assert not any(r.packed for r in plan_rows(reqs, **args))
    assert len(plan_rows(reqs, max_length=64, window=None, pack=False)) == 4

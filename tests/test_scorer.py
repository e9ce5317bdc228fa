"""The selective scorer gives HFLM's log-likelihoods and greedy flags (1e-5), on tiny models."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from seap.evaluation.harness import make_lm  # noqa: E402
from seap.models import load_model  # noqa: E402

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
    return reqs


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_selective_equals_hflm(family, tmp_path):
    lm = load_model(str(tiny_folder(tmp_path, family)))
    reqs = _requests(23)
    # max_length 32 makes the longest requests truncate from the left, as HFLM does
    for max_length in (None, 32):
        ref = make_lm(lm.model, lm.tokenizer, batch_size=4, max_length=max_length, exact=True)
        fast = make_lm(lm.model, lm.tokenizer, batch_size=4, max_length=max_length)
        assert type(fast).__name__ == "SelectiveHFLM"
        a = ref.loglikelihood(reqs, disable_tqdm=True)
        b = fast.loglikelihood(reqs, disable_tqdm=True)
        assert [g for _, g in a] == [g for _, g in b]
        assert torch.allclose(torch.tensor([x for x, _ in a]), torch.tensor([x for x, _ in b]), atol=1e-5, rtol=0)
        # a rolling (perplexity) request reads every position: the same windows and sums
        text = " ".join(r.args[0] for r in reqs[:6])
        roll = [Instance("loglikelihood_rolling", {}, (text,), 0)]
        assert ref.loglikelihood_rolling(roll, disable_tqdm=True)[0] == pytest.approx(
            fast.loglikelihood_rolling(roll, disable_tqdm=True)[0], abs=1e-4)

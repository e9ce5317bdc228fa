"""lm-eval's HFLM with the LM head applied only where a log-likelihood is read (docs/design.md §4).

HFLM computes logits and a log-softmax over the whole vocabulary at every position of every
request, although a multiple-choice item reads only its continuation's few positions. With
Gemma 3's 262,144-entry head that is most of the work (and a [batch, length, 262k] float32
tensor per batch). `SelectiveHFLM` batches the requests as HFLM does (longest first, right
padding, no attention mask, left truncation to the model's length) and asks the model for the
logits of the union of the batch's continuation positions only (`logits_to_keep`, which the
transformers causal LMs apply before their head). Requests with the same input (the choices
of a question whose answers are one token long) share one row, as in HFLM's one-token grouping.
The log-likelihoods and greedy flags are HFLM's: the same model, inputs and positions (the test
compares them at 1e-5; on the bundled Gemma 3 the largest difference is 2e-5 on sums of about -50,
from the LM head's float32 summation order on fewer rows).
Everything else (generation, rolling perplexity's windows, caching) is HFLM's own code.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - the eval extra is missing
    raise ConfigError("evaluation needs lm-evaluation-harness: pip install 'seap[eval]'") from err


class SelectiveHFLM(HFLM):
    """HFLM whose log-likelihoods compute the LM head at the continuation positions only."""

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _logits_at(self, inps: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[batch, len(keep), vocab] logits of the positions `keep` (sorted, on the model's device)."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            if self._keeps_logits:
                return self.model(inps, logits_to_keep=keep).logits
            return self.model(inps).logits[:, keep]  # an architecture without logits_to_keep

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":  # encoder-decoder models: HFLM's path
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        bs = self.batch_size if self.batch_size != "auto" else (override_bs or 1)
        bs = max(int(bs), 1)
        # One row per distinct model input (left-truncated as HFLM): the choices of a question whose
        # continuations are one token long share their input, as in HFLM's one-token grouping.
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError("each request needs a context and a continuation no longer than the model")
            rows.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
        order = sorted(rows, key=lambda inp: (-len(inp), inp))  # HFLM's order: longest first, little padding
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            batch = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
            spans = []  # (batch row, request, first and last+1 position predicting its continuation)
            for r, inp in enumerate(chunk):
                batch[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                spans += [(r, i, len(inp) - len(requests[i][2]), len(inp)) for i in rows[inp]]
            keep = sorted({p for _, _, a, b in spans for p in range(a, b)})
            where = {p: j for j, p in enumerate(keep)}
            logits = self._logits_at(batch.to(self.device), torch.tensor(keep, dtype=torch.long, device=self.device))
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for r, i, a, b in spans:
                request_str, _, cont = requests[i]
                dist = logp[r, [where[p] for p in range(a, b)]]  # [len(cont), vocab]
                target = torch.tensor(cont, dtype=torch.long, device=dist.device)
                answer = (float(dist.gather(1, target[:, None]).sum()), bool((dist.argmax(-1) == target).all()))
                results[i] = answer
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return results

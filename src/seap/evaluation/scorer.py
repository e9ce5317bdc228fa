"""lm-eval's HFLM, computing only what a multiple-choice log-likelihood reads (docs/design.md §4).

HFLM runs every (context, continuation) request as its own row and computes logits and a
log-softmax over the whole vocabulary at every position. A multiple-choice item reads only its
continuations' few positions, and its choices repeat one context. `SelectiveHFLM` computes the
same numbers with two savings:

- the LM head only at the positions whose log-likelihood is read (`logits_to_keep`, which the
  transformers causal LMs apply before their head). With Gemma 3's 262,144-entry head that was most
  of the work, and a [batch, length, 262k] float32 tensor per batch;
- the shared context once per question: the choices' continuations are packed after it in one
  row, each attending to the context and to itself only (a 4D attention mask), at the positions it
  would have on its own (`position_ids`). ARC and OpenBookQA run about 2.7 and 2 times fewer tokens.

A request is packed only where packing cannot change what the model sees: no left truncation,
its whole input inside the model's sliding window (a custom mask replaces the window), and an
attention implementation that takes an additive 4D mask (eager, sdpa). Every other request runs
as HFLM runs it: its own row (choices whose answers are one token long still share one), longest
first, right padding, no attention mask. The test compares log-likelihoods and greedy flags with
HFLM's at 1e-5 on three architectures. On the bundled SmolLM2 (lm-eval's requests for 10 items a
task) the largest difference is 4.4e-5 on a 7-token sum of -21, 1.1e-5 per token, greedy flags
equal: float32 rounding of other batch shapes and attention kernels. Generation, rolling perplexity
and caching are HFLM's own code.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - the eval extra is missing
    raise ConfigError("evaluation needs lm-evaluation-harness: pip install 'seap[eval]'") from err

_MASKABLE = ("eager", "sdpa")  # attention implementations that read an additive 4D mask


@dataclass
class Row:
    """One model input: `tokens` (a context, then packed continuation segments), each token's
    segment (0: the shared context, k: the k-th segment) and position, and the requests it answers
    with the positions whose logits predict their continuation tokens."""

    tokens: list[int]
    segment: list[int]
    position: list[int]
    reads: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def packed(self) -> bool:
        return any(self.segment)


def plan_rows(requests: list[tuple[list[int], list[int]]], max_length: int, window: int | None,
              pack: bool) -> list[Row]:
    """The rows that answer `requests` (context, continuation tokens): packed per shared context
    where `pack` and nothing is truncated or beyond the sliding `window`, HFLM's rows otherwise."""
    plain: dict[tuple[int, ...], list[int]] = {}
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(cont) > max_length:
            raise ValueError("each request needs a context and a continuation no longer than the model")
        length = len(ctx) + len(cont) - 1
        if pack and length <= max_length and (window is None or length <= window):
            groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont[:-1]), []).append(i)
        else:  # HFLM's input: left-truncated to the model's length
            plain.setdefault(tuple((ctx + cont)[-(max_length + 1):][:-1]), []).append(i)
    rows = []
    for ctx, segments in groups.items():
        if len(segments) == 1:  # nothing to share: HFLM's row
            (seg, members), = segments.items()
            plain.setdefault(ctx + seg, []).extend(members)
            continue
        row = Row(list(ctx), [0] * len(ctx), list(range(len(ctx))))
        for k, (seg, members) in enumerate(segments.items(), start=1):
            start = len(row.tokens)
            row.tokens += seg
            row.segment += [k] * len(seg)
            row.position += range(len(ctx), len(ctx) + len(seg))
            # the context's last position predicts the first continuation token, the segment the rest
            row.reads += [(i, [len(ctx) - 1, *range(start, start + len(seg))]) for i in members]
        rows.append(row)
    for inp, members in plain.items():
        n = len(inp)
        rows.append(Row(list(inp), [0] * n, list(range(n)),
                        [(i, list(range(n - len(requests[i][1]), n))) for i in members]))
    return rows


def packed_mask(rows: list[Row], width: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, width, width] additive mask: a token sees the earlier tokens of the context and of
    its own segment; padding sees itself only (a row with no visible key would turn NaN)."""
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        seg[r, :len(row.segment)] = torch.tensor(row.segment, dtype=torch.long)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q)) | torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class SelectiveHFLM(HFLM):
    """HFLM whose log-likelihoods run each shared context once and the LM head where it is read."""

    pack_contexts = True  # False: one row per request as HFLM (the benchmark measures the packing's share)

    @functools.cached_property
    def _forward_takes(self) -> set[str]:
        return set(inspect.signature(self.model.forward).parameters)

    @functools.cached_property
    def _packs(self) -> bool:
        impl = getattr(self.model.config, "_attn_implementation", None)
        return self.pack_contexts and "position_ids" in self._forward_takes and impl in _MASKABLE

    @functools.cached_property
    def _window(self) -> int | None:
        """The sliding window of an architecture whose layers use one (a packed mask replaces it)."""
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window is None or (types is not None and "sliding_attention" not in types):
            return None
        return int(window)

    def _logits_at(self, rows: list[Row], keep: torch.Tensor) -> torch.Tensor:
        """[batch, len(keep), vocab] logits of the positions `keep` (sorted, on the model's device)."""
        width = len(rows[0].tokens)
        inps = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            inps[r, :len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        kwargs = {"use_cache": False} if "use_cache" in self._forward_takes else {}
        if any(row.packed for row in rows):
            pos = torch.zeros_like(inps)
            for r, row in enumerate(rows):
                pos[r, :len(row.position)] = torch.tensor(row.position, dtype=torch.long)
            kwargs["position_ids"] = pos.to(self.device)
            dtype = self.mixed_precision_dtype or self.model.dtype  # SDPA wants the queries' dtype
            kwargs["attention_mask"] = packed_mask(rows, width, dtype).to(self.device)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            if "logits_to_keep" in self._forward_takes:
                return self.model(inps.to(self.device), logits_to_keep=keep, **kwargs).logits
            return self.model(inps.to(self.device), **kwargs).logits[:, keep]  # no logits_to_keep here

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":  # encoder-decoder models: HFLM's path
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        bs = self.batch_size if self.batch_size != "auto" else (override_bs or 1)
        bs = max(int(bs), 1)
        rows = plan_rows([(ctx, cont) for _, ctx, cont in requests], self.max_length, self._window, self._packs)
        # HFLM's order, longest first (little padding); packed rows batch apart, as they need a mask
        rows.sort(key=lambda row: (-len(row.tokens), row.tokens))
        batches = []
        for packed in (False, True):
            part = [row for row in rows if row.packed == packed]
            batches += [part[a:a + bs] for a in range(0, len(part), bs)]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests")
        for batch in batches:
            keep = sorted({p for row in batch for _, ps in row.reads for p in ps})
            where = {p: j for j, p in enumerate(keep)}
            logits = self._logits_at(batch, torch.tensor(keep, dtype=torch.long, device=self.device))
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for r, row in enumerate(batch):
                for i, positions in row.reads:
                    request_str, _, cont = requests[i]
                    dist = logp[r, [where[p] for p in positions]]  # [len(cont), vocab]
                    target = torch.tensor(cont, dtype=torch.long, device=dist.device)
                    answer = (float(dist.gather(1, target[:, None]).sum()), bool((dist.argmax(-1) == target).all()))
                    results[i] = answer
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return results

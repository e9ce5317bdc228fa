"""One greedy decode loop for torch models, with pluggable FFN selection.

`greedy` is what every torch generation path of seap runs: `seap bench` times it, `seap generate`,
XSum and routed experts decode with it. What the FFN computes is the model's business:

- the model as it is (selection None): dense, a statically sliced copy, or a MultiExpertModel
  inside `use()` (routed experts, each sequence on its own);
- a `selection` that changes the FFN per call: GRIFFIN (seap.inference.griffin.GriffinSelection) watches
  the dense prefill and picks each prompt's experts, then the decode steps run through them.

transformers' generate() adds per-token work that does not shrink with the model (logits
processors, stopping criteria, input preparation); this loop does only what a serving stack does,
and with greedy decoding both take the argmax, so they give the same tokens (tests/test_decoding.py).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..model.loading import encode_left_padded, max_positions

Finished = Callable[[torch.Tensor], "torch.Tensor | None"]


class FFNSelection(Protocol):
    """How a decode picks the FFN neurons it runs through. `prefill` is entered around the dense
    prefill forward (with the [B, S] mask of real prompt tokens: a statistic must skip padding),
    `decode` around the decode steps; both must restore the model on exit, error or not. `stats`
    (read after the decode) lands in Decoded.stats."""

    stats: dict[str, float]

    def prefill(self, model: nn.Module, attention_mask: torch.Tensor) -> AbstractContextManager: ...

    def decode(self, model: nn.Module) -> AbstractContextManager: ...


@dataclass
class Decoded:
    tokens: torch.Tensor  # [B, n] new tokens, n <= new_tokens (shorter when every row stopped)
    prefill_s: float
    decode_s: float
    kv_cache_bytes: int
    stats: dict[str, float] = field(default_factory=dict)  # the selection's, e.g. GRIFFIN's kept/union shares


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: every sequence starts at 0 at its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    """Bytes held by a transformers KV cache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, *,
           attention_mask: torch.Tensor | None = None, selection: FFNSelection | None = None,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
           finished: Finished | None = None) -> Decoded:
    """Greedy decoding with the KV cache: a prefill, then `new_tokens - 1` one-token steps.

    `attention_mask` (left padding): explicit position ids, so that each row counts from its first
    real token as it would alone. Without it the model counts positions from its cache and gets no
    mask: nothing is built per step. With `eos_token_id` (one id or several), a row that produced
    one is done; `finished(tokens so far)` may return a [B] bool of rows done for another reason (a
    stop string). Done rows continue with `pad_token_id` (default: the first eos id), as generate()
    pads them, and the loop ends when every row is done. None of this runs per step unless asked."""
    if new_tokens < 1:
        raise ConfigError(f"new tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    padded = attention_mask is not None
    pos = positions(attention_mask) if padded else None
    eos = None
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(ids, device=device) if ids else None
    fill = pad_token_id if pad_token_id is not None else (None if eos is None else int(eos[0]))
    stopping = eos is not None or finished is not None
    prefill_ctx, decode_ctx = nullcontext(), nullcontext()
    if selection is not None:  # the statistic's real tokens: all of them without padding
        prefill_ctx = selection.prefill(model, attention_mask if padded else torch.ones_like(input_ids))

    sync(device)
    t0 = time.perf_counter()
    with prefill_ctx:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    cache = out.past_key_values
    # One buffer filled in place: `finished` sees a view of the tokens so far, nothing is concatenated per step.
    tokens = torch.empty(input_ids.shape[0], new_tokens, dtype=nxt.dtype, device=device)
    tokens[:, :1] = nxt
    n = 1
    mask, last_pos = attention_mask, None if pos is None else pos[:, -1:]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device) if stopping else None
    if selection is not None:
        decode_ctx = selection.decode(model)
    with decode_ctx:
        for _ in range(new_tokens - 1):
            if stopping:
                if eos is not None:
                    done |= torch.isin(nxt[:, 0], eos)
                if finished is not None and (hit := finished(tokens[:, :n])) is not None:
                    done |= hit.to(device)
                if bool(done.all()):
                    break
            if padded:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
                last_pos = last_pos + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=last_pos, past_key_values=cache,
                        use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if stopping and fill is not None:
                nxt = torch.where(done[:, None], fill, nxt)
            cache = out.past_key_values
            tokens[:, n:n + 1] = nxt
            n += 1
    sync(device)
    t2 = time.perf_counter()
    stats = dict(getattr(selection, "stats", None) or {})
    return Decoded(tokens[:, :n], t1 - t0, t2 - t1, cache_bytes(cache), stats)


# -- text in, text out ------------------------------------------------------------------------------
def stop_token_ids(lm) -> list[int]:
    """The ids that end a sequence: those of the model's generation config (what generate() stops at;
    instruct models list their end-of-turn token there), else the tokenizer's eos."""
    ids = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(lm.tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    ends = [text.index(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def stop_strings_seen(tokenizer, stop: Sequence[str], every: int = 4) -> Finished:
    """A `finished` test for `greedy`: which rows' text holds a stop string (checked every `every`
    tokens, since decoding the text costs more than a small model's step)."""
    def finished(tokens: torch.Tensor) -> torch.Tensor | None:
        if tokens.shape[1] % every:
            return None
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in stop) for t in texts])
    return finished


def check_lengths(config, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse prompts that, with the tokens to generate, need more positions than the model has (past
    them a model runs on, but on positions it never learnt: the continuation means nothing)."""
    limit = max_positions(config)
    if limit is None or not lengths or max(lengths) + max_new_tokens <= limit:
        return
    i = max(range(len(lengths)), key=lambda k: lengths[k])
    raise DataError(f"prompt {i + 1} has {lengths[i]:,} tokens and the model has {limit:,} positions: with "
                    f"{max_new_tokens} new tokens (`max_new_tokens`) a prompt can have at most "
                    f"{max(limit - max_new_tokens, 0):,}: shorten it")


def generate_texts(lm, prompts: Sequence[str], max_new_tokens: int = 64, *,
                   selection: FFNSelection | None = None, stop: Sequence[str] = (),
                   special_tokens: bool = True) -> tuple[list[str], Decoded]:
    """Greedy continuations of a left-padded batch of prompts, each cut at its first stop string.
    `special_tokens=False` for prompts that already hold them (a chat template)."""
    tok = lm.tokenizer
    stop = [s for s in stop if s]
    device = lm.model.get_input_embeddings().weight.device  # where the ids go, with a device map too
    enc = encode_left_padded(tok, prompts, device, special_tokens=special_tokens)
    check_lengths(lm.model.config, enc["attention_mask"].sum(1).tolist(), max_new_tokens)
    out = greedy(lm.model, enc["input_ids"], max_new_tokens, attention_mask=enc["attention_mask"],
                 selection=selection, eos_token_id=stop_token_ids(lm) or None,
                 pad_token_id=getattr(tok, "pad_token_id", None),
                 finished=stop_strings_seen(tok, stop) if stop else None)
    texts = tok.batch_decode(out.tokens, skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in texts], out

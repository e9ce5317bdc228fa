"""Token perplexity on WikiText-2 raw test (docs/design.md §4): "\\n\\n"-joined rows, non-overlapping windows.

This is *token* perplexity (exp of the mean next-token loss over the model's own tokens), so it
depends on the tokenizer; lm-eval's word perplexity (harness.WORD_PPL_TASK) is reported apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..tasks import TASKS, load_rows


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    window: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def wikitext_stream(data_dir: str | Path | None = None, split: str = "test") -> tuple[str, str]:
    """The raw WikiText-2 split as one string (rows joined with "\\n\\n", the usual convention)."""
    ds, source = load_rows(TASKS["wikitext2"], split, data_dir)
    text = "\n\n".join(ds["text"])
    if not text.strip():
        raise DataError(f"{source} holds no text: it must be the wikitext-2-raw-v1 {split} split")
    return text, source


@torch.no_grad()
def token_perplexity(model: nn.Module, tokenizer, text: str, *, window: int = 1024, max_windows: int | None = None,
                     batch_size: int = 1, source: str = "memory", progress: bool = True) -> Perplexity:
    """exp(mean NLL) over non-overlapping `window`-token windows of `text` (first token of each unpredicted)."""
    if window < 2:
        raise ConfigError(f"perplexity window must be at least 2 tokens, got {window}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1, got {max_windows}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and window > limit:
        raise ConfigError(f"window {window} exceeds the model's {limit} positions: pass a smaller --ppl-window")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one {window}-token window")
    chunks = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = chunks[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                           reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, n, window, source)

"""The tokenizer as loaded and as saved: loading remembers the fast backend's truncation and padding,
saving writes them back, so what calibration or batching set meanwhile never reaches a saved folder."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: str | Path, **kwargs):
    """AutoTokenizer.from_pretrained, remembering the fast backend's truncation and padding as loaded:
    save_tokenizer writes them back so, whatever calibration or batching set meanwhile."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        tokenizer._seap_loaded_backend = (backend.truncation, backend.padding)
    return tokenizer


def _set_backend(backend, truncation: dict | None, padding: dict | None) -> None:
    if truncation:
        backend.enable_truncation(**truncation)
    else:
        backend.no_truncation()
    if padding:
        backend.enable_padding(**padding)
    else:
        backend.no_padding()


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)` as it was loaded. Calling a fast tokenizer with truncation or
    padding sets them on its backend for good (calibration's max_length 512, say), and a tokenizer.json
    carrying them makes the plain `tokenizers` library cut every input; one that seap did not load is
    saved with neither."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        tokenizer.save_pretrained(folder)
        return
    current = (backend.truncation, backend.padding)
    _set_backend(backend, *getattr(tokenizer, "_seap_loaded_backend", (None, None)))
    try:
        tokenizer.save_pretrained(folder)
    finally:
        _set_backend(backend, *current)

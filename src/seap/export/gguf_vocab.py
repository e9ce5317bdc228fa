"""The tokenizer of a GGUF export: copied key by key from a GGUF of the base model when there is one
(the bundled models, a `.gguf` base, or `tokenizer_from`), so llama.cpp tokenises exactly as the
original file did; otherwise rebuilt from the Hugging Face tokenizer with the gguf package's vocab
readers (llama.cpp then picks its default pre-tokenizer for BPE vocabularies and says so)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..errors import ModelError
from ..model.loading import resolve_model
from ..model.tokenizer import save_tokenizer
from .source import ExportSource

log = logging.getLogger(__name__)


def write_tokenizer(w, src: ExportSource, n_vocab: int, tokenizer_from: str | None) -> str:
    """The tokenizer's keys into GGUF writer `w`, for an embedding of `n_vocab` rows; where they came from."""
    source = _source_gguf(src, tokenizer_from)
    if source is not None and source.is_file():
        _copy_tokenizer(w, source, n_vocab)
        return str(source)
    _hf_tokenizer(w, src, n_vocab)
    return "hugging face tokenizer"


def _source_gguf(lm: ExportSource, explicit: str | None) -> Path | None:
    """A GGUF of the base model, whose tokenizer metadata is authoritative."""
    if explicit:
        return Path(explicit)
    if lm.source.gguf_file:
        return Path(lm.source.path) / lm.source.gguf_file
    record = getattr(lm.model.config, "seap_pruning", None) or {}
    base = record.get("base_model")
    if not base:
        return None
    try:
        src = resolve_model(base)
    except ModelError:
        return None
    return Path(src.path) / src.gguf_file if src.gguf_file else None


def _copy_tokenizer(w, source: Path, n_vocab: int) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelError(f"{source} holds no tokenizer (tokenizer.ggml.tokens): give --tokenizer-from another GGUF")
    n = len(fields["tokenizer.ggml.tokens"].data)
    if n != n_vocab:
        raise ModelError(f"{source} has {n} tokens but the model's embedding has {n_vocab} rows: give "
                         "--tokenizer-from the GGUF this model was made from")
    for key, f in fields.items():
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), main, sub_type=sub)


def _hf_tokenizer(w, lm: ExportSource, n_vocab: int) -> None:
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(lm.tokenizer, tmp)
        folder = Path(tmp)
        spm = (folder / "tokenizer.model").is_file()
        vocab = SentencePieceVocab(folder) if spm else BpeVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        if len(tokens) > n_vocab:
            raise ModelError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
        while len(tokens) < n_vocab:  # embedding rows past the vocabulary (padding to a multiple)
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(5)  # UNUSED
        w.add_tokenizer_model("llama" if spm else "gpt2")
        if not spm:
            log.warning("tokenizer rebuilt from the Hugging Face files: llama.cpp will use its default BPE "
                        "pre-tokenizer; pass --tokenizer-from <base>.gguf for an exact copy")
        w.add_token_list(tokens)
        if spm:
            w.add_token_scores(scores)
        w.add_token_types(types)
        SpecialVocab(folder, load_merges=not spm, n_vocab=n_vocab).add_to_gguf(w)

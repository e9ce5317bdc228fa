"""Tiny random models of each adapter family (built from configs, no network) and a byte tokenizer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GRIFFIN's cached priors of the tests' tiny models go to a throwaway folder, not the user's cache.
os.environ["SEAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="seap-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEAP_CACHE_DIR"], True)  # removed when the run ends

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class ByteTokenizer:
    """Enough of a Hugging Face tokenizer for seap: bytes as ids, padding, truncation, save."""

    pad_token_id = 0
    eos_token_id = 1
    eos_token = "<eos>"
    padding_side = "right"

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [2 + (b % (self.vocab_size - 2)) for b in text.encode()]

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=512):
        ids = [self.encode(t)[:max_length] for t in texts]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, seq in enumerate(ids):
            if self.padding_side == "right":
                input_ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            else:
                input_ids[r, width - len(seq):] = torch.tensor(seq)
                mask[r, width - len(seq):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save_pretrained(self, folder):
        Path(folder, "byte_tokenizer.txt").write_text("test tokenizer\n")


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    cfg.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=1, head_dim=8, max_position_embeddings=256, sliding_window=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval()


def tiny_opt(**kw):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
               max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**cfg)).eval()
    # Random init leaves biases at zero; give them values so bias handling is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


FAMILIES = {"llama": tiny_llama, "gemma3": tiny_gemma3, "opt": tiny_opt}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What gas do plants take in?\nAnswer: carbon dioxide",
    "A short one.",
    "Pruning removes the channels that a workload does not use, keeping the rest.",
    "Question: How do you keep bread fresh?\nAnswer: Store it in a sealed bag.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
    "Water boils at one hundred degrees at sea level.",
    "x",
] * 2


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


def make_loaded(family: str, **kw):
    from seap.model.adapters import get_adapter
    from seap.model.loading import LoadedModel, ModelSource

    model = FAMILIES[family](**kw)
    return LoadedModel(model, ByteTokenizer(), get_adapter(model), ModelSource(f"tiny-{family}", f"tiny-{family}"))


def has_shared_data() -> bool:
    return SHARED_DATA.is_dir()


def byte_level_tokenizer(merges: bool = False):
    """A real (saveable, AutoTokenizer-loadable) byte-level tokenizer with 256 + 2 tokens (+ 2 merged
    ones with `merges`: llama.cpp refuses a BPE vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    pairs = [("Ġ", "t"), ("e", "r")] if merges else []
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(pairs)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_folder(tmp_path: Path, family: str, merges: bool = False, **kw) -> Path:
    """A tiny random model of `family` saved as a Hugging Face folder with a real tokenizer."""
    model = FAMILIES[family](vocab_size=260, **kw)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    byte_level_tokenizer(merges).save_pretrained(folder)
    return folder


def left_padded(seqs):
    """Token sequences as one left-padded batch (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):], mask[r, width - len(s):] = s, 1
    return ids, mask


def plan_for(lm, cfg, texts=TEXTS, heads=None):
    """A plan of `cfg` for a tiny model, from statistics of TEXTS (returns the plan and the statistics)."""
    from seap.calibration.layerwise import collect_stats
    from seap.model.fingerprints import fingerprint
    from seap.pruning.plan import build_plan

    heads = lm.model.config.model_type == "opt" if heads is None else heads
    stats = collect_stats(lm.model, lm.tokenizer, lm.adapter, texts, heads=heads, meta={"corpus": "t"},
                          progress=False)
    return build_plan(lm.model, lm.adapter, cfg, {"t": stats}, base_model="tiny", revision=None,
                      fingerprint=fingerprint(lm.model, lm.adapter)), stats


def one_line_error(argv, capsys, *fragments):
    """`seap argv` fails with exit status 2 and one line that starts "seap: error:" and names each fragment."""
    from seap.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("seap: error:"), err
    for f in fragments:
        assert f in err, err


def padded_decode(model, out, mask, pos, steps: int, handles) -> torch.Tensor:
    """An independent reference decode: from a padded prefill's output `out`, `steps` greedy one-token
    steps with explicit positions, then the first token and those steps as [B, steps + 1]; the hooks in
    `handles` are removed afterwards, whatever happens."""
    try:
        nxt, tokens, cache = out.logits[:, -1:].argmax(-1), [], out.past_key_values
        for step in range(steps):
            tokens.append(nxt)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + step + 1,
                        past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(tokens, dim=1)

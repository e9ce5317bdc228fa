"""Seeded random-weight checkpoints with the exact geometry of real models, for cost at scale.

    python benchmarks/checkpoints.py llama-3.1-8b /tmp/ckpt/llama-3.1-8b

Written as the hub ships them (bf16 sharded safetensors of at most 5 GB, config.json, a real
tokenizer), one tensor at a time with seap's streaming writer, so an 8B checkpoint is written
with about one embedding matrix in memory. Their accuracy means nothing; time, memory and bytes
of anything run on them are exact. The tokenizer is SmolLM2's (49,152 tokens, from the bundled
GGUF), which indexes only the first rows of a Llama-3 embedding: what it costs does not change.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# The published config.json values of each model (geometry, vocabulary, tying, RoPE).
GEOMETRIES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    # on paper only (benchmarks/on_paper.py): 141 GB in bf16, more than this machine's disk holds
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                          max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                          rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}


def config_for(name: str, layers: int | None = None):
    from transformers import LlamaConfig

    geometry = {**GEOMETRIES[name], **({"num_hidden_layers": layers} if layers else {})}
    cfg = LlamaConfig(**geometry, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.dtype = torch.bfloat16
    return cfg


def real_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the bundled GGUF (no network)."""
    from transformers import AutoTokenizer

    from seap.model.loading import resolve_model

    src = resolve_model("smollm2-135m")
    return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)


def _value(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // max(1, shape[-1]))  # ~64 MB of float32 at a time
    for r in range(0, shape[0], rows):
        out[r:r + rows] = torch.randn((min(rows, shape[0] - r), *shape[1:]), generator=g).mul_(std).bfloat16()
    return out


def write_checkpoint(name: str, folder: str | Path, *, seed: int = 0, std: float = 0.02,
                     shard_size: str = "5GB", layers: int | None = None) -> Path:
    """A random-weight bf16 checkpoint of `name`'s geometry in `folder` (atomically); `layers` keeps
    only that many decoder layers (a per-layer profile at full width, in minutes)."""
    from seap._io import atomic_dir
    from seap.model.checkpoint import parse_size, write_tensors
    from seap.model.pruned_folder import tensor_specs
    from seap.model.skeleton import empty_model

    cfg = config_for(name, layers)
    skeleton = empty_model(cfg, torch.bfloat16)
    specs = tensor_specs(skeleton, torch.bfloat16)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_tensors(tmp, ((s.name, _value(s.name, s.shape, seed, std)) for s in specs), specs, parse_size(shard_size))
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(tmp)
        real_tokenizer().save_pretrained(tmp)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(GEOMETRIES))
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers (a per-layer profile)")
    args = ap.parse_args()
    path = write_checkpoint(args.name, args.folder, seed=args.seed, shard_size=args.shard_size, layers=args.layers)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path} ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()

"""DeciLM / Nemotron-NAS configuration for folders written by `seap export --format vllm`.

Copied into the exported folder (config.json's auto_map points here), so vLLM and transformers
read it with `trust_remote_code=True`. `block_configs` holds one entry per layer; vLLM's
DeciLMForCausalLM reads it by attribute: `block.attention.n_heads_in_group` (query heads per KV
head) and `block.ffn.intermediate_size`. There is deliberately no `ffn_mult`: given one, vLLM
rounds the FFN width up to a multiple of 256, which would not match a pruned layer's weights.

This file must import nothing but transformers: it runs inside the serving process.
"""

from __future__ import annotations

from transformers import LlamaConfig


class Section:
    """One part of a block (attention or ffn): its settings as attributes."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"Section({self.__dict__})"


class BlockConfig:
    def __init__(self, attention: dict | Section, ffn: dict | Section):
        self.attention = attention if isinstance(attention, Section) else Section(**attention)
        self.ffn = ffn if isinstance(ffn, Section) else Section(**ffn)

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return out

"""The supported families. One class each; model types that share a layout share a class."""

from __future__ import annotations

from torch import nn

from .base import Adapter, zero_bias


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/3, SmolLM2: SwiGLU FFN, grouped-query attention, RMSNorm."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite")
    layers_paths = ("model.layers",)
    embed_paths = ("model.embed_tokens",)
    ffn_in_names = ("mlp.gate_proj", "mlp.up_proj")
    ffn_out_name = "mlp.down_proj"
    q_name, k_name, v_name, o_name = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj")
    activation = "swiglu"

    def supports_native_ffn_out_bias(self, config) -> bool:
        return hasattr(config, "mlp_bias")

    def enable_ffn_out_bias(self, config) -> None:
        # `mlp_bias` gives gate, up and down a bias; the gate and up biases stay zero.
        config.mlp_bias = True

    def prepare_ffn_out_bias(self, layer: nn.Module) -> None:
        for lin in (*self.ffn_in(layer), self.ffn_out(layer)):
            zero_bias(lin)


class Gemma3Adapter(Adapter):
    """Gemma 3 (text and the text tower of the multimodal model): GeGLU FFN, GQA, q/k norms."""

    family = "gemma3"
    model_types = ("gemma3_text", "gemma3", "gemma2", "gemma")
    layers_paths = ("model.layers", "model.language_model.layers", "language_model.model.layers")
    embed_paths = ("model.embed_tokens", "model.language_model.embed_tokens",
                   "language_model.model.embed_tokens")
    ffn_in_names = ("mlp.gate_proj", "mlp.up_proj")
    ffn_out_name = "mlp.down_proj"
    q_name, k_name, v_name, o_name = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj")
    activation = "geglu"

    def prepare_ffn_out_bias(self, layer: nn.Module) -> None:
        zero_bias(self.ffn_out(layer))


class OPTAdapter(Adapter):
    """OPT: ReLU FFN (fc1/fc2 with biases), multi-head attention with biases."""

    family = "opt"
    model_types = ("opt",)
    layers_paths = ("model.decoder.layers",)
    embed_paths = ("model.decoder.embed_tokens",)
    ffn_in_names = ("fc1",)
    ffn_out_name = "fc2"
    q_name, k_name, v_name, o_name = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.out_proj")
    ffn_width_key = "ffn_dim"
    activation = "relu"

    def supports_native_ffn_out_bias(self, config) -> bool:
        return bool(getattr(config, "enable_bias", True))

    def enable_ffn_out_bias(self, config) -> None:
        config.enable_bias = True

    def prepare_ffn_out_bias(self, layer: nn.Module) -> None:
        zero_bias(self.ffn_out(layer))

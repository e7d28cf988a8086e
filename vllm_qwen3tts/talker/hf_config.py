"""The `qwen3_tts` Hugging Face config as vLLM sees it.

vLLM sizes the KV cache and builds the decoder from `get_text_config()`; we
return the talker as a stock `Qwen3Config`, with the declared multimodal RoPE
(three identical position streams) presented as the plain 1-D RoPE it
is, so vLLM needs no M-RoPE state.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3Config


def talker_text_config(talker: dict[str, Any]) -> Qwen3Config:
    rope_theta = talker.get("rope_theta") or (talker.get("rope_parameters") or {}).get("rope_theta", 1_000_000)
    return Qwen3Config(
        vocab_size=talker["vocab_size"],
        hidden_size=talker["hidden_size"],
        intermediate_size=talker["intermediate_size"],
        num_hidden_layers=talker["num_hidden_layers"],
        num_attention_heads=talker["num_attention_heads"],
        num_key_value_heads=talker["num_key_value_heads"],
        head_dim=talker.get("head_dim") or talker["hidden_size"] // talker["num_attention_heads"],
        hidden_act=talker.get("hidden_act", "silu"),
        max_position_embeddings=talker.get("max_position_embeddings", 32768),
        rms_norm_eps=talker.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_bias=False,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )


class Qwen3TTSConfig(PretrainedConfig):
    model_type = "qwen3_tts"

    def __init__(self, talker_config: dict | None = None, text_config: Any = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = Qwen3Config(**text_config)
        if text_config is None and talker_config:
            text_config = talker_text_config(talker_config)
        # set before the base __init__, whose validation already asks for the text config
        self.talker_config = talker_config or {}
        self.text_config = text_config
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.text_config

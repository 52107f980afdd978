"""Named model configs for planning offline: the GaLore paper's LLaMA sizes, LLaMA-2 13B and 70B, and a tiny one
for tests.

60m to 7b are the GaLore repository's `configs/llama_*.json` (the paper's pre-training runs): vocabulary 32,000,
untied embeddings, RMSNorm eps 1e-6, full multi-head attention. 13b and 70b are LLaMA-2's published shapes
(meta-llama/Llama-2-13b-hf, Llama-2-70b-hf: RMSNorm eps 1e-5, 4,096 positions; 70b with 8 key-value heads).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

__all__ = ["PRESETS", "preset_config"]

_LLAMA_COMMON: dict[str, Any] = {"vocab_size": 32000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}

# name -> LlamaConfig keyword arguments
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
    "llama-60m": {
        **_LLAMA_COMMON,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "max_position_embeddings": 1024,
    },
    "llama-130m": {
        **_LLAMA_COMMON,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 1024,
    },
    "llama-350m": {
        **_LLAMA_COMMON,
        "hidden_size": 1024,
        "intermediate_size": 2736,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 1024,
    },
    "llama-1b": {
        **_LLAMA_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 5461,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "max_position_embeddings": 1024,
    },
    "llama-7b": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "llama-13b": {
        **_LLAMA_COMMON,
        "rms_norm_eps": 1e-5,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "max_position_embeddings": 4096,
    },
    "llama-70b": {
        **_LLAMA_COMMON,
        "rms_norm_eps": 1e-5,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
    },
}


def preset_config(name: str) -> LlamaConfig:
    """The config of a named preset; an unknown name raises a `ValueError` listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Presets: {', '.join(PRESETS)}.")
    return LlamaConfig(**PRESETS[name])

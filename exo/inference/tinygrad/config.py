"""A Hugging Face `config.json` reduced to what the tinygrad blocks need, plus RoPE tables.

Kept free of tinygrad imports so the numbers (head sizes, RoPE frequencies) can be checked
without loading a backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelConfig":
        """Read the fields the MLX engine's mlx-lm blocks read, with the same defaults."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; the tinygrad engine runs "
                             f"{sorted(SUPPORTED_MODEL_TYPES)}")
        if config.get("quantization"):
            raise ValueError("the tinygrad engine loads float weights only; this model is MLX-quantized")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        qwen = model_type == "qwen2"
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type, hidden_size=hidden, n_layers=int(config["num_hidden_layers"]),
            n_heads=heads, n_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6 if qwen else 1e-5)),
            rope_theta=float(config.get("rope_theta", 1000000.0 if qwen else 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            # mlx-lm: llama ties by default, qwen2 too (its ModelArgs default is True).
            tied=bool(config.get("tie_word_embeddings", True)),
            # qwen2 always has q/k/v biases and never an output bias; llama follows attention_bias.
            qkv_bias=True if qwen else attention_bias, o_bias=False if qwen else attention_bias,
            mlp_bias=False if qwen else bool(config.get("mlp_bias", False)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        )


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies (head_dim/2,), float64, with llama3/linear scaling applied.

    Other scaling schemes (yarn, dynamic, longrope) change attention in ways this engine does
    not implement, so they are refused rather than silently run unscaled.
    """
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelength = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        blend = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        scaled = np.where(wavelength > original / low, inv / factor, inv)
        mid = (wavelength <= original / low) & (wavelength >= original / high)
        return np.where(mid, (1 - blend) * inv / factor + blend * inv, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported by the tinygrad engine "
                     "(supported: default, linear, llama3)")


def rope_tables(config: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (positions, head_dim/2) float32, computed in float64 for accuracy."""
    angles = np.arange(positions, dtype=np.float64)[:, None] * rope_inverse_frequencies(config)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

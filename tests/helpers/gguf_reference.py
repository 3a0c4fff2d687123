"""Independent oracle for GGUF llama conversion.

Reads the GGUF with MLX's own loader (not the ``gguf`` package), keeps
llama.cpp's permuted q/k rows as they are, and runs mlx-lm's llama with
``rope_traditional=True`` (interleaved rotary pairs, which is what the
permutation targets). If ``convert_gguf``'s un-permute is right, the converted
model (non-traditional rope) must produce the same logits up to float error.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _scalar(meta: dict, key: str, default: object = None) -> object:
    v = meta.get(key, default)
    return v.item() if hasattr(v, "item") else v


def native_gguf_llama_logits(gguf_path: str | Path, token_ids: list[int]) -> np.ndarray:
    """Logits (T, V) float32 for ``token_ids`` from an unconverted llama GGUF, via MLX's native GGUF reader."""
    import mlx.core as mx
    from mlx_lm.models import llama

    raw, meta = mx.load(str(gguf_path), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: not a llama GGUF")
    weights: dict[str, mx.array] = {}
    for key, w in raw.items():
        stem, kind = key.rsplit(".", 1)
        if kind in ("scales", "biases") and f"{stem}.weight" in raw and f"{stem}.scales" in raw:
            continue  # consumed with its .weight below
        if f"{stem}.scales" in raw:  # MLX maps Q4_0/Q4_1/Q8_0 to affine quantization with group 32
            # float32 scales so the dequantized weights are not rounded to float16
            scales, biases = raw[f"{stem}.scales"].astype(mx.float32), raw[f"{stem}.biases"].astype(mx.float32)
            in_dim = scales.shape[-1] * 32
            bits = w.shape[-1] * 32 // in_dim
            w = mx.dequantize(w, scales, biases, group_size=32, bits=bits)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if m:
            name = f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
        elif stem in _GLOBAL:
            name = _GLOBAL[stem]
        else:
            raise ValueError(f"unexpected GGUF tensor {key}")
        weights[f"{name}.{kind}"] = w.astype(mx.float32)

    a = "llama."
    n_head = int(_scalar(meta, a + "attention.head_count"))
    hidden = int(_scalar(meta, a + "embedding_length"))
    q_rows = weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=int(_scalar(meta, a + "block_count")),
        intermediate_size=int(_scalar(meta, a + "feed_forward_length")), num_attention_heads=n_head,
        rms_norm_eps=float(_scalar(meta, a + "attention.layer_norm_rms_epsilon")),
        vocab_size=weights["model.embed_tokens.weight"].shape[0], head_dim=q_rows // n_head,
        num_key_value_heads=int(_scalar(meta, a + "attention.head_count_kv", n_head)),
        rope_theta=float(_scalar(meta, a + "rope.freq_base", 10000.0)), rope_traditional=True,
        tie_word_embeddings="lm_head.weight" not in weights,
    )
    model = llama.Model(args)
    model.load_weights(list(weights.items()), strict=True)
    logits = model(mx.array([token_ids]))[0].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)

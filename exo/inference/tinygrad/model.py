"""Any layer range of a llama/qwen2-family model on tinygrad's tensor API.

Why the shapes are what they are:
- The KV cache of a request is preallocated per layer, `(1, kv_heads, capacity, head_dim)`;
  a pass writes its new keys/values at `[offset, offset+T)` and attends to `[0, offset+T)`.
  Rollback is moving the offset back: the stale rows are overwritten before they are read.
- `offset` enters the graph as a bound symbolic variable, so one compiled program serves
  every offset; inputs are padded to a few bucket lengths, so one program (and one TinyJit
  capture) serves every input length in a bucket. Padding rows come after the real rows,
  so the causal mask keeps them out of every real row's attention.
- The token embedding is looked up on the host (numpy): tinygrad gathers by comparing
  against the whole vocabulary, which would read the full table on every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tinygrad import Device, Tensor, TinyJit, UOp, dtypes
from tinygrad.nn.state import safe_load

from exo.inference.shard import Shard, place_checkpoint_key
from exo.inference.tinygrad.config import ModelConfig, rope_tables

# Input lengths are padded up to one of these; longer inputs run in chunks of the largest.
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(length: int) -> int:
    """The smallest bucket holding `length` rows (callers chunk anything longer)."""
    for size in BUCKETS:
        if length <= size:
            return size
    raise ValueError(f"{length} rows exceed the largest bucket {BUCKETS[-1]}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * (x.square().mean(axis=-1, keepdim=True) + eps).rsqrt() * weight


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Hugging Face layout: weight is (out, in)."""
    out = x.matmul(weight.T)
    return out + bias if bias is not None else out


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face / mlx-lm non-traditional layout); x is (1, H, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


class ShardedTinyModel:
    """Weights of one shard plus the compiled programs that run it."""

    def __init__(self, config: dict[str, Any], shard: Shard, max_context: int, device: str | None = None,
                 dtype: str = "float32", use_jit: bool = True):
        self.config = cfg = ModelConfig.from_dict(config)
        if cfg.n_layers != shard.n_layers:
            raise ValueError(f"{shard} does not match the model's {cfg.n_layers} layers")
        self.shard = shard
        self.device = device or Device.DEFAULT
        self.dtype = getattr(dtypes, dtype)
        self.max_context = max(1, min(max_context, cfg.max_position_embeddings))
        # Room for a padded bucket that starts at the last usable position.
        self.capacity = self.max_context + BUCKETS[-1]
        self.use_jit = use_jit
        cos, sin = rope_tables(cfg, self.capacity)
        self.cos = Tensor(cos, device=self.device).cast(self.dtype).contiguous().realize()
        self.sin = Tensor(sin, device=self.device).cast(self.dtype).contiguous().realize()
        self.layers: list[dict[str, Tensor]] = []
        self.embedding: np.ndarray | None = None  # host copy for the lookup (first shard)
        self.norm: Tensor | None = None
        self.head: Tensor | None = None
        self._offset = UOp.variable("offset", 0, self.max_context - 1)
        self._body_jits: dict[int, Any] = {}
        self._head_jits: dict[int, Any] = {}

    # ----------------------------------------------------------------- weights
    def load(self, model_dir: Path) -> None:
        """Read this shard's tensors from the checkpoint's safetensors files."""
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
        layers: list[dict[str, Tensor]] = [{} for _ in range(self.shard.get_layer_count())]
        embedding = lm_head = norm = None
        for file in files:
            for key, value in safe_load(str(file)).items():
                placed = place_checkpoint_key(key, self.shard)
                if placed is None:
                    continue
                layer, name = placed
                if layer is not None:
                    layers[layer][name] = self._to_device(value)
                elif name == "embed_tokens.weight":
                    embedding = value
                elif name == "norm.weight" and self.shard.is_last_layer():
                    norm = self._to_device(value)
                elif name == "lm_head.weight" and self.shard.is_last_layer() and not self.config.tied:
                    lm_head = self._to_device(value)
        cfg = self.config
        expected = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
        if cfg.qkv_bias:
            expected |= {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
        if cfg.o_bias:
            expected.add("self_attn.o_proj.bias")
        if cfg.mlp_bias:
            expected |= {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"}
        for i, layer in enumerate(layers):
            missing, extra = expected - layer.keys(), layer.keys() - expected
            if missing or extra:
                raise ValueError(f"layer {self.shard.start_layer + i} of {model_dir}: missing {sorted(missing)}, "
                                 f"unexpected {sorted(extra)}")
        needs_embedding = self.shard.is_first_layer() or (self.shard.is_last_layer() and cfg.tied)
        if needs_embedding and embedding is None:
            raise ValueError(f"{model_dir} has no model.embed_tokens.weight")
        if self.shard.is_last_layer() and (norm is None or (not cfg.tied and lm_head is None)):
            raise ValueError(f"{model_dir} lacks the final norm or lm_head.weight")
        self.layers = layers
        if self.shard.is_first_layer():
            self.embedding = embedding.cast(dtypes.float32).numpy()
        if self.shard.is_last_layer():
            self.norm = norm
            self.head = self._to_device(embedding) if cfg.tied else lm_head
        self._body_jits.clear()
        self._head_jits.clear()

    def _to_device(self, value: Tensor) -> Tensor:
        return value.to(self.device).cast(self.dtype).contiguous().realize()

    # ----------------------------------------------------------------- caches
    def make_cache(self) -> list[Tensor]:
        """Keys and values for every layer of this shard: [k0, v0, k1, v1, ...]."""
        cfg = self.config
        shape = (1, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        return [Tensor.zeros(*shape, dtype=self.dtype, device=self.device).contiguous().realize()
                for _ in range(2 * len(self.layers))]

    # ----------------------------------------------------------------- forward
    def _block(self, layer: dict[str, Tensor], x: Tensor, k_cache: Tensor, v_cache: Tensor,
               offset: UOp, mask: Tensor | None) -> Tensor:
        cfg = self.config
        length = x.shape[1]
        h = rms_norm(x, layer["input_layernorm.weight"], cfg.rms_norm_eps)
        q = linear(h, layer["self_attn.q_proj.weight"], layer.get("self_attn.q_proj.bias"))
        k = linear(h, layer["self_attn.k_proj.weight"], layer.get("self_attn.k_proj.bias"))
        v = linear(h, layer["self_attn.v_proj.weight"], layer.get("self_attn.v_proj.bias"))
        q = q.reshape(1, length, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.reshape(1, length, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.reshape(1, length, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = self.cos[offset:offset + length], self.sin[offset:offset + length]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache[:, :, offset:offset + length].assign(k).realize()
        v_cache[:, :, offset:offset + length].assign(v).realize()
        keys, values = k_cache[:, :, :offset + length], v_cache[:, :, :offset + length]
        group = cfg.n_heads // cfg.n_kv_heads
        # Grouped-query attention without copying keys: (1, kv, group, T, hd) against (1, kv, 1, S, hd).
        q = q.reshape(1, cfg.n_kv_heads, group, length, cfg.head_dim)
        scores = q.matmul(keys.unsqueeze(2).transpose(-1, -2)) * (cfg.head_dim ** -0.5)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1).matmul(values.unsqueeze(2))
        attn = attn.reshape(1, cfg.n_heads, length, cfg.head_dim).transpose(1, 2).reshape(1, length, -1)
        x = x + linear(attn, layer["self_attn.o_proj.weight"], layer.get("self_attn.o_proj.bias"))
        h = rms_norm(x, layer["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = linear(h, layer["mlp.gate_proj.weight"], layer.get("mlp.gate_proj.bias"))
        up = linear(h, layer["mlp.up_proj.weight"], layer.get("mlp.up_proj.bias"))
        # Realized per layer: the next layer's cache writes would otherwise recompute this one.
        return (x + linear(gate.silu() * up, layer["mlp.down_proj.weight"], layer.get("mlp.down_proj.bias"))).realize()

    def _body(self, x: Tensor, cache: list[Tensor], offset: UOp) -> Tensor:
        length = x.shape[1]
        mask = None
        if length > 1:
            mask = Tensor.full((1, 1, 1, length, offset + length), float("-inf"), dtype=self.dtype,
                               device=self.device).triu(offset + 1)
        for i, layer in enumerate(self.layers):
            x = self._block(layer, x, cache[2 * i], cache[2 * i + 1], offset, mask)
        return x.realize()

    def _head(self, h: Tensor) -> Tensor:
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.head).realize()

    def _run_body(self, x: np.ndarray, cache: list[Tensor], offset: int) -> np.ndarray:
        """One padded chunk through the shard's layers: (1, bucket, D) in and out."""
        bound = self._offset.bind(offset)
        inp = Tensor(x, device=self.device).cast(self.dtype).contiguous().realize()
        if not self.use_jit:
            return self._body(inp, cache, bound).numpy().astype(np.float32, copy=False)
        jit = self._body_jits.get(x.shape[1])
        if jit is None:
            jit = self._body_jits[x.shape[1]] = TinyJit(self._body)
        # Copied out at once: a captured JIT reuses its output buffer on the next call.
        return jit(inp, cache, bound).numpy().astype(np.float32, copy=False)

    def _run_head(self, h: np.ndarray) -> np.ndarray:
        inp = Tensor(h, device=self.device).cast(self.dtype).contiguous().realize()
        if not self.use_jit:
            return self._head(inp).numpy().astype(np.float32, copy=False)
        jit = self._head_jits.get(h.shape[1])
        if jit is None:
            jit = self._head_jits[h.shape[1]] = TinyJit(self._head)
        return jit(inp).numpy().astype(np.float32, copy=False)

    def forward(self, x: np.ndarray, cache: list[Tensor], offset: int,
                last_positions: int | None = None) -> np.ndarray:
        """Token ids (1, T) on a first shard, hidden states (1, T, D) elsewhere; returns hidden
        states (1, T, D), or on the last shard logits for the final `last_positions` rows
        (every row if None), as float32 numpy."""
        if self.shard.is_first_layer():
            ids = x.reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= self.embedding.shape[0]):
                raise ValueError(f"token id out of range [0, {self.embedding.shape[0]})")
            hidden = self.embedding[ids.astype(np.int64)][None]
        else:
            hidden = np.asarray(x, dtype=np.float32)
        length = hidden.shape[1]
        if length == 0:
            raise ValueError("empty input")
        if offset + length > self.max_context:
            raise ValueError(f"context overflow: {offset} cached + {length} new tokens exceed the "
                             f"engine's {self.max_context}-token KV cache")
        outputs = []
        for start in range(0, length, BUCKETS[-1]):
            chunk = hidden[:, start:start + BUCKETS[-1]]
            real = chunk.shape[1]
            padded = np.zeros((1, bucket_for(real), chunk.shape[2]), dtype=np.float32)
            padded[:, :real] = chunk
            outputs.append(self._run_body(padded, cache, offset + start)[:, :real])
        hidden = np.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]
        if not self.shard.is_last_layer():
            return hidden
        rows = length if last_positions is None else max(1, min(last_positions, length))
        hidden = hidden[:, -rows:]
        logits = []
        for start in range(0, rows, BUCKETS[-1]):
            chunk = hidden[:, start:start + BUCKETS[-1]]
            real = chunk.shape[1]
            padded = np.zeros((1, bucket_for(real), chunk.shape[2]), dtype=np.float32)
            padded[:, :real] = chunk
            logits.append(self._run_head(padded)[:, :real])
        return np.concatenate(logits, axis=1) if len(logits) > 1 else logits[0]

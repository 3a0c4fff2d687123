"""Any layer range of a llama/qwen2-family model, built from mlx-lm's blocks.

Only the first shard owns the embedding and only the last owns the final norm and head, so
a shard's memory is proportional to its layers. The causal mask for a multi-token input is
built from the offset of *this shard's* first cache, so a multi-token verify works on a
shard that does not start at layer 0 (upstream Exo read a cache that never advanced).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache

from exo.inference.engine import context_of
from exo.inference.mlx.packed import PackedRows, packed_block, split_rows
from exo.inference.shard import Shard, place_checkpoint_key

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2, "mistral": llama}


def architecture_for(config: dict[str, Any]) -> ModuleType:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; the MLX engine runs {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


class ShardedModel(nn.Module):
    def __init__(self, config: dict[str, Any], shard: Shard):
        super().__init__()
        arch = architecture_for(config)
        self.args = args = arch.ModelArgs.from_dict(config)
        if args.num_hidden_layers != shard.n_layers:
            raise ValueError(f"{shard} does not match the model's {args.num_hidden_layers} layers")
        self.shard = shard
        self.max_context = context_of(config)  # the window its config declares (None: unknown)
        self.tied = bool(getattr(args, "tie_word_embeddings", False))
        if shard.is_first_layer() or (shard.is_last_layer() and self.tied):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [arch.TransformerBlock(args) for _ in range(shard.get_layer_count())]
        if shard.is_last_layer():
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not self.tied:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, x: mx.array, cache: list[KVCache], last_positions: int | None = None,
                 head: mx.array | None = None) -> mx.array:
        """Token ids (B, T) on a first shard, hidden states (B, T, D) elsewhere.

        On the last shard, `last_positions` limits the head to the final positions: a
        prefill needs one row of logits, and the head over a long prompt is the costliest
        matmul of the pass. `head` (N, D), from `head_weight`, replaces the output head.
        """
        h = self.embed_tokens(x) if self.shard.is_first_layer() else x
        length = h.shape[1]
        mask = create_causal_mask(length, offset=cache[0].offset) if length > 1 else None
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        if not self.shard.is_last_layer():
            return h
        if last_positions is not None:
            h = h[:, -last_positions:]
        h = self.norm(h)
        if head is not None:
            return h @ head.T
        return self.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)

    def packed(self, inputs: list[mx.array], caches: list[list[KVCache]], last_positions: list[int | None],
               heads: list[mx.array | None]) -> list[mx.array]:
        """One pass over several requests' inputs (each `(1, T_i)` ids or `(1, T_i, D)` hidden
        states), row i at the offset of its own `caches[i]`; the outputs as `__call__` gives
        them for each row alone (see `packed.py`)."""
        lengths = [x.shape[1] for x in inputs]
        rows = PackedRows.of(lengths, [cache[0].offset for cache in caches])
        h = inputs[0] if len(inputs) == 1 else mx.concatenate(inputs, axis=1)
        if self.shard.is_first_layer():
            h = self.embed_tokens(h)
        for index, layer in enumerate(self.layers):
            h = packed_block(layer, h, rows, [cache[index] for cache in caches])
        if not self.shard.is_last_layer():
            return split_rows(h, lengths, [None] * len(inputs))
        kept = split_rows(h, lengths, last_positions)
        outputs: list[mx.array | None] = [None] * len(inputs)
        groups: dict[int, list[int]] = {}  # rows sharing one head get one product
        for row, head in enumerate(heads):
            groups.setdefault(id(head), []).append(row)
        for members in groups.values():
            head = heads[members[0]]
            joined = self.norm(mx.concatenate([kept[r] for r in members], axis=1) if len(members) > 1
                               else kept[members[0]])
            if head is not None:
                logits = joined @ head.T
            else:
                logits = self.embed_tokens.as_linear(joined) if self.tied else self.lm_head(joined)
            start = 0
            for r in members:
                outputs[r] = logits[:, start:start + kept[r].shape[1]]
                start += kept[r].shape[1]
        return outputs  # type: ignore[return-value]

    def head_weight(self, ids: mx.array) -> mx.array | None:
        """The output head's rows `ids` as a dense (N, D) matrix; None where it is quantized
        (its packed rows would need their scales gathered too)."""
        layer = self.embed_tokens if self.tied else self.lm_head
        if hasattr(layer, "scales"):
            return None
        rows = layer.weight[ids]
        mx.eval(rows)
        return rows

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def select_weights(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a full checkpoint's Hugging Face keys to this shard's, dropping the rest."""
        selected: dict[str, mx.array] = {}
        for key, value in weights.items():
            placed = place_checkpoint_key(key, self.shard)
            if placed is None:
                continue
            layer, name = placed
            if layer is not None:
                selected[f"layers.{layer}.{name}"] = value
            elif name.startswith("embed_tokens.") and hasattr(self, "embed_tokens"):
                selected[name] = value
            elif name.startswith("norm.") and self.shard.is_last_layer():
                selected[name] = value
            elif name.startswith("lm_head.") and self.shard.is_last_layer() and not self.tied:
                selected[name] = value
        return selected

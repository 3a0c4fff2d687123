"""One forward pass over several requests' rows, each row at its own offset in its own cache.

The rows are laid end to end along the sequence axis, `(1, T1 + T2 + ..., D)`, so every
weight matrix is read once per pass for all of them; only attention, the one part that
reads a request's own cache, runs row by row (with that row's offset, its causal mask and
nothing of the others). Nothing is padded and no row can see another's keys, so a row's
numbers are those of the same row run alone wherever the matrix products are computed row
by row: exo's few-row kernel does, up to `exo.blas.row_exact_rows()` rows, so
`exact_groups` packs rows within that bound and runs a longer one (a prompt) by itself, as
it would run alone. Where no bound is known (another BLAS, Apple's GPU) every row is packed
into one pass and may round differently from its solo run, within float32 rounding.

Written against mlx-lm's llama/qwen2 blocks: `self_attn` with q/k/v/o projections, `rope`,
`n_heads`, `n_kv_heads`, `scale`; `mlp`; the two RMS norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention


def exact_groups(lengths: list[int], limit: int | None) -> list[list[int]]:
    """Rows (by index, in order) packed into passes of at most `limit` positions; a row longer
    than `limit` alone. `limit` None: one pass for all."""
    if limit is None:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if length > limit:
            groups.append([index])
            continue
        if used + length > limit:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class PackedRows:
    """Where each row sits in a packed pass, built once per pass for every layer."""
    spans: list[tuple[int, int]]  # (first position in the pass, length) per row
    positions: mx.array  # each packed position's place in its own row's sequence (int32)
    masks: list[mx.array | None]  # per row: none for one token, causal over its own cache for more

    @classmethod
    def of(cls, lengths: list[int], offsets: list[int]) -> "PackedRows":
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        positions = np.concatenate([np.arange(o, o + n) for n, o in zip(lengths, offsets)]).astype(np.int32)
        masks = [create_causal_mask(n, offset=o) if n > 1 else None for n, o in zip(lengths, offsets)]
        return cls(list(zip(starts, lengths)), mx.array(positions), masks)


def packed_block(block: Any, x: mx.array, rows: PackedRows, caches: list[Any]) -> mx.array:
    """`block`'s forward over packed rows `x` (1, T, D); row i uses `caches[i]`.

    Every position is laid out as a batch entry of its own, (T, heads, 1, head_dim), so one
    rotary call places all of them at once (rope with one offset per batch entry, exactly as
    it places a row's positions from the row's offset); each row then takes its slice as
    (1, heads, length, head_dim) for its cache and its attention."""
    attn = block.self_attn
    total = x.shape[1]
    normed = block.input_layernorm(x)

    def heads(projected: mx.array, n: int) -> mx.array:
        return projected.reshape(total, 1, n, -1).transpose(0, 2, 1, 3)

    queries = attn.rope(heads(attn.q_proj(normed), attn.n_heads), offset=rows.positions)
    keys = attn.rope(heads(attn.k_proj(normed), attn.n_kv_heads), offset=rows.positions)
    values = heads(attn.v_proj(normed), attn.n_kv_heads)
    outputs = []
    for (start, length), cache, mask in zip(rows.spans, caches, rows.masks):
        span = slice(start, start + length)
        q, k, v = (a[span].swapaxes(0, 2) for a in (queries, keys, values))
        k, v = cache.update_and_fetch(k, v)
        outputs.append(scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask))
    attended = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    h = x + attn.o_proj(attended.transpose(0, 2, 1, 3).reshape(1, total, -1))
    return h + block.mlp(block.post_attention_layernorm(h))


def split_rows(h: mx.array, lengths: list[int], keep: list[int | None]) -> list[mx.array]:
    """Row i's last `keep[i]` positions (None: all of them) out of packed `h` (1, T, D)."""
    pieces, start = [], 0
    for length, last in zip(lengths, keep):
        first = start if last is None else start + length - min(last, length)
        pieces.append(h[:, first:start + length])
        start += length
    return pieces

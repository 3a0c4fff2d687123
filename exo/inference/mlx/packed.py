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

from typing import Any

import mlx.core as mx
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


def causal_masks(lengths: list[int], offsets: list[int]) -> list[mx.array | None]:
    """Each row's mask: none for one token, causal over its own cache for more."""
    return [create_causal_mask(n, offset=o) if n > 1 else None for n, o in zip(lengths, offsets)]


def packed_block(block: Any, x: mx.array, lengths: list[int], caches: list[Any],
                 masks: list[mx.array | None]) -> mx.array:
    """`block`'s forward over packed rows `x` (1, sum(lengths), D); row i uses `caches[i]`."""
    attn = block.self_attn
    normed = block.input_layernorm(x)
    queries, keys, values = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
    outputs, start = [], 0
    for length, cache, mask in zip(lengths, caches, masks):
        rows = slice(start, start + length)
        q = queries[:, rows].reshape(1, length, attn.n_heads, -1).transpose(0, 2, 1, 3)
        k = keys[:, rows].reshape(1, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = values[:, rows].reshape(1, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = attn.rope(q, offset=cache.offset), attn.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
        outputs.append(out.transpose(0, 2, 1, 3).reshape(1, length, -1))
        start += length
    attended = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
    h = x + attn.o_proj(attended)
    return h + block.mlp(block.post_attention_layernorm(h))


def split_rows(h: mx.array, lengths: list[int], keep: list[int | None]) -> list[mx.array]:
    """Row i's last `keep[i]` positions (None: all of them) out of packed `h` (1, T, D)."""
    pieces, start = [], 0
    for length, last in zip(lengths, keep):
        first = start if last is None else start + length - min(last, length)
        pieces.append(h[:, first:start + length])
        start += length
    return pieces

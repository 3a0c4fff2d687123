"""Decoding references: what plain (non-speculative) decoding produces, and stream collection."""

from __future__ import annotations

from exo.inference.generate import GenerationParams, generate_plain
from exo.inference.mlx.engine import MLXInferenceEngine


async def collect(stream) -> list[int]:
    """Every token a generation yields, in order: a stream of blocks (token lists or
    `Emitted`), or a context manager that gives one (entered here, so its tasks end with it)."""
    if hasattr(stream, "__aiter__"):
        return [token async for block in stream for token in getattr(block, "tokens", block)]
    async with stream as blocks:
        return [token async for block in blocks for token in getattr(block, "tokens", block)]


_references: dict[tuple, list[int]] = {}


async def _decode_plainly(model_dir, prompt, params: GenerationParams) -> list[int]:
    engine = MLXInferenceEngine()
    try:
        shard = await engine.full_shard(str(model_dir))
        await engine.ensure_shard(shard)
        return await collect(generate_plain(engine, shard, prompt, params, frozenset()))
    finally:
        engine.close()


async def plain_tokens(model_dir, prompt, params: GenerationParams) -> list[int]:
    """Plain decoding of `prompt` on a fresh MLX engine: the reference speculation must equal.

    Greedy or seeded plain decoding is deterministic, so such a reference is computed once
    per session: many parametrized tests compare against the same one."""
    if params.temperature > 0 and params.seed is None:
        return await _decode_plainly(model_dir, prompt, params)
    key = (str(model_dir), tuple(int(t) for t in prompt), repr(params))
    if key not in _references:
        _references[key] = await _decode_plainly(model_dir, prompt, params)
    return list(_references[key])

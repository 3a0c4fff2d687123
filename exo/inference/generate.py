"""Plain autoregressive generation on one engine holding a whole model."""

from __future__ import annotations

import uuid
from typing import AsyncIterator

import msgspec
import numpy as np

from exo.inference.engine import InferenceEngine, last_only
from exo.inference.logprobs import MAX_TOP_LOGPROBS
from exo.inference.sampling import judge_rng, sample_last
from exo.inference.shard import Shard


class GenerationParams(msgspec.Struct, frozen=True):
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # None: off; N: each token's log-prob plus N top alternatives

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")


async def generate_plain(engine: InferenceEngine, shard: Shard, prompt_ids: list[int],
                         params: GenerationParams, eos_ids: frozenset[int] = frozenset(),
                         request_id: str | None = None) -> AsyncIterator[list[int]]:
    """Yield generated tokens (one-element lists, the multi-token shape speculation uses)."""
    request_id = request_id or uuid.uuid4().hex
    rng = judge_rng(params.seed)
    try:
        logits, _ = await engine.infer_tensor(request_id, shard, np.asarray([prompt_ids]), last_only())
        for produced in range(params.max_tokens):
            token = sample_last(logits, params.temperature, params.top_k, params.top_p, rng)
            yield [token]
            if token in eos_ids or produced + 1 == params.max_tokens:
                return
            logits, _ = await engine.infer_tensor(request_id, shard, np.asarray([[token]]))
    finally:
        engine.free_cache(request_id)

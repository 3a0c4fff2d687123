"""Sequential speculation: draft a block, verify it, emit, repeat.

With no proposer (speculation off, or the draft failed) every block is K = 0, which is
exactly plain decoding through the same verification path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from exo.inference.generate import GenerationParams
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.metrics import SpeculativeMetrics
from exo.speculative.proposer import DraftBlock, DraftProposer
from exo.speculative.verifier import TargetVerifier

log = logging.getLogger("exo.speculative")


@dataclass
class SpeculativeRequest:
    request_id: str
    prompt: list[int]
    params: GenerationParams
    eos_ids: frozenset[int]
    threshold: float
    controller: AdaptiveK
    metrics: SpeculativeMetrics = field(default_factory=SpeculativeMetrics)
    finish_reason: str | None = None


def _finish(request: SpeculativeRequest, produced: int, emitted: list[int]) -> list[int]:
    """Cut `emitted` at end-of-sequence or the token budget, setting the finish reason."""
    for i, token in enumerate(emitted):
        if token in request.eos_ids:
            request.finish_reason = "stop"
            return emitted[: i + 1]
        if produced + i + 1 >= request.params.max_tokens:
            request.finish_reason = "length"
            return emitted[: i + 1]
    return emitted


async def run_sequential(request: SpeculativeRequest, verifier: TargetVerifier,
                         proposer: DraftProposer | None) -> AsyncIterator[list[int]]:
    """Yield each verified block's emitted tokens (1..K+1 per yield)."""
    rid, params = request.request_id, request.params
    rng = np.random.default_rng(params.seed)
    committed = list(request.prompt)
    start = time.perf_counter()
    first = _finish(request, 0, [await verifier.prefill(rid, committed, params, rng)])
    committed += first
    produced = len(first)
    request.metrics.prefill_time = time.perf_counter() - start
    yield first
    while request.finish_reason is None:
        k = request.controller.choose() if proposer is not None else 0
        block = DraftBlock([], np.zeros((0, 0)), len(committed))
        started = time.perf_counter()
        if k:
            try:
                block = await proposer.propose(rid, committed, k, params, request.threshold, rng)
            except Exception:
                log.exception("draft model failed in request %s; continuing with plain decoding", rid)
                request.metrics.draft_failures += 1
                proposer = None
        drafted = time.perf_counter()
        emitted = await verifier.verify(rid, committed, block, params, rng)
        verified = time.perf_counter()
        accepted = len(emitted) - 1
        if proposer is not None and block.k:
            try:
                proposer.accept(rid, block.base_length + accepted)
            except Exception:
                log.exception("draft cache rollback failed in request %s; continuing with plain decoding", rid)
                request.metrics.draft_failures += 1
                proposer = None
        if proposer is None and request.metrics.draft_failures:
            request.metrics.fallback_steps += 1
        request.controller.observe(block.k, accepted, drafted - started, verified - drafted)
        request.metrics.record_step(block.k, accepted, len(emitted), drafted - started, verified - drafted)
        emitted = _finish(request, produced, emitted)
        committed += emitted
        produced += len(emitted)
        yield emitted

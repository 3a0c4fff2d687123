"""Sequential speculation: draft a block, verify it, emit, repeat.

With no proposer (speculation off, or the draft failed) every block is K = 0, which is
exactly plain decoding through the same verification path.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractAsyncContextManager, aclosing
from typing import AsyncIterator

from exo.inference.sampling import draft_rng, judge_rng
from exo.speculative.drafters import DraftBlock, Proposer
from exo.speculative.pipeline.common import Emitted, SpeculativeRequest
from exo.speculative.verifier import Verifier

log = logging.getLogger("exo.speculative")


def sequential_blocks(request: SpeculativeRequest, verifier: Verifier,
                      proposer: Proposer | None) -> AbstractAsyncContextManager[AsyncIterator[Emitted]]:
    """`run_sequential` in the shape of `pipelined_blocks`: `async with` it to read the blocks."""
    return aclosing(run_sequential(request, verifier, proposer))


async def run_sequential(request: SpeculativeRequest, verifier: Verifier,
                         proposer: Proposer | None) -> AsyncIterator[Emitted]:
    """Yield each verified block (1..K+1 tokens per yield). It runs no task of its
    own, so a generator is safe here (no task group is open across a yield)."""
    rid, params = request.request_id, request.params
    rng, proposal_rng = judge_rng(request.params.seed), draft_rng(request.params.seed)
    committed = await request.prefill(verifier, rng, proposer)
    yield request.emitted(committed[len(request.prompt):])
    proposer = await request.prefill_draft(proposer)
    while request.finish_reason is None:
        k = (request.draft_budget(proposer.limit(request.controller.choose()), request.produced)
             if proposer is not None else 0)
        block = DraftBlock([], None, len(committed))
        started = time.perf_counter()
        if k:
            try:
                block = await proposer.propose(rid, committed, k, params, request.config.threshold, proposal_rng,
                                               trusted=request.controller.trusted_depth(request.config.threshold))
                request.drafted(block)
            except Exception as exc:
                log.exception("draft model failed in request %s; continuing with plain decoding", rid)
                request.draft_failed(f"draft failed: {exc}")
                proposer = None
        drafted = time.perf_counter()
        verdict = await verifier.verify(committed, block, rng)
        verified = time.perf_counter()
        emitted = request.finish(verdict.emitted, verdict.logprobs)
        if proposer is not None:
            try:
                if block.k:
                    proposer.accept(rid, block.base_length + verdict.accepted)
                proposer.verified(rid, block, verdict.accepted, len(committed) + len(emitted))
            except Exception as exc:
                log.exception("draft cache rollback failed in request %s; continuing with plain decoding", rid)
                request.draft_failed(f"draft rollback failed: {exc}")
                proposer = None
        request.verified(block, verdict, emitted, drafted - started, verified - drafted, proposer is not None)
        committed += emitted
        yield request.emitted(emitted)

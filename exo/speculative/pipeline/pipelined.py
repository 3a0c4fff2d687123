"""Pipelined speculation: the drafter drafts block n+1 while the verifier checks block n.

    drafter --DraftBlock--> submitter --Flight--> verifier --VerdictMessage--> drafter
                                                     \\--emitted tokens--> consumer

Tasks in one task group, joined by bounded memory streams. The drafter assumes every
block in flight will be fully accepted and keeps drafting past it; the submitter sends up
to a window of blocks to the verifier before the first verdict is back (a ring of stages
then computes several at once, see window.py), and the verifier takes their verdicts in
order. The verifier defers the
bonus token of a fully accepted block (see BlockJudge), so the drafter's next block
stays valid; when a verdict commits a token the drafter did not propose, the epoch moves
on: blocks of the old epoch are dropped unverified, the draft cache is rolled back to the
committed prefix and drafting restarts from the corrected token. No draft token reaches
the output without passing the verifier against the committed sequence.

`pipelined_blocks` is an async context manager, not a generator: the task group lives in
the caller's `async with`, so no generator suspends with it open (PEP 789) and leaving the
`async with`, at the end, early or by an error, stops both tasks. There is no `aclose()`
for a consumer to forget.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from exo.inference.sampling import BlockDraftRngs, judge_rng
from exo.speculative.drafters import DraftBlock, Proposer
from exo.speculative.pipeline.common import Emitted, SpeculativeRequest
from exo.speculative.pipeline.window import Window, window_cap
from exo.speculative.verifier import Verifier

log = logging.getLogger("exo.speculative")
DRAFTS_AHEAD = 1  # blocks drafted beyond the window (one waits while the window is full)


@dataclass(frozen=True)
class VerdictMessage:
    epoch: int  # the verifier's epoch after this verdict
    emitted: list[int]
    accepted: int


@dataclass(frozen=True)
class Flight:
    block: DraftBlock
    ticket: int  # the verifier's handle for its verdict
    epoch: int


@dataclass
class SideTimes:
    busy: float = 0.0
    idle: float = 0.0


@asynccontextmanager
async def pipelined_blocks(request: SpeculativeRequest, verifier: Verifier,
                           proposer: Proposer | None) -> AsyncIterator[ObjectReceiveStream[Emitted]]:
    """A stream of verified blocks while drafting and verifying run
    concurrently; a failure comes out of the `async with` as itself, not in an exception group."""
    out_send, out_recv = anyio.create_memory_object_stream[Emitted](math.inf)  # the verifier never waits
    with out_send, out_recv:  # closed even if the request is stopped before its task starts
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_run, request, verifier, proposer, out_send)
                try:
                    yield out_recv
                finally:
                    group.cancel_scope.cancel()  # the consumer is done: whatever is left is moot
        except BaseExceptionGroup as group_error:
            raise single_error(group_error) from None


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one real failure inside (nested) task-group errors, so callers see a plain error."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    real = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    return (real or leaves)[0]


async def _run(request: SpeculativeRequest, verifier: Verifier, proposer: Proposer | None,
               out_send: ObjectSendStream[Emitted]) -> None:
    async with out_send:  # the request's end is the stream's
        rng = judge_rng(request.params.seed)
        committed = await request.prefill(verifier, rng, proposer)
        await out_send.send(request.emitted(committed[len(request.prompt):]))
        if request.finish_reason is not None:
            return
        proposer = await request.prefill_draft(proposer)
        window = Window(window_cap(request.config.ring_window, verifier.stages), request.config.ring_window == 0,
                        list(committed))
        block_send, block_recv = anyio.create_memory_object_stream[DraftBlock](1)
        flight_send, flight_recv = anyio.create_memory_object_stream[Flight](math.inf)  # the window bounds it
        verdict_send, verdict_recv = anyio.create_memory_object_stream[VerdictMessage](math.inf)
        times = {"draft": SideTimes(), "verify": SideTimes()}
        async with anyio.create_task_group() as group:
            if proposer is not None:
                group.start_soon(_drafter, request, proposer, list(committed), BlockDraftRngs(request.params.seed),
                                 block_send, verdict_recv, times["draft"], window.cap + DRAFTS_AHEAD)
                group.start_soon(_submitter, verifier, window, block_recv, flight_send)
            else:
                block_send.close()
                flight_send.close()
            await _verifier(request, verifier, committed, rng, window, flight_recv, verdict_send, out_send,
                            times["verify"])
            group.cancel_scope.cancel()  # the request is finished: stop drafting at once
        request.metrics.pipeline_idle = {side: t.idle for side, t in times.items()}
        request.metrics.pipeline_busy = {side: t.busy for side, t in times.items()}


async def _submitter(verifier: Verifier, window: Window, blocks: ObjectReceiveStream[DraftBlock],
                     flights: ObjectSendStream[Flight]) -> None:
    """Send each drafted block to the verifier as soon as the window has room."""
    async with blocks, flights:
        async for block in blocks:
            while block.epoch == window.epoch and not window.has_room():
                await window.changed.wait()
            if block.epoch != window.epoch:
                continue  # drafted before the last divergence: never verified, never emitted
            if block.base_length != len(window.sequence):
                raise RuntimeError(f"block extends {block.base_length} tokens but {len(window.sequence)} "
                                   f"are committed or in flight")
            epoch, base = window.epoch, list(window.sequence)
            window.sent(block.tokens)  # before the send: a verdict may end the epoch meanwhile
            ticket = await verifier.submit(base, block, defer_bonus=True)
            if window.epoch == epoch:
                await flights.send(Flight(block, ticket, epoch))


async def _verifier(request: SpeculativeRequest, verifier: Verifier, committed: list[int],
                    rng: np.random.Generator, window: Window, flights: ObjectReceiveStream[Flight],
                    verdicts: ObjectSendStream[VerdictMessage], out: ObjectSendStream[Emitted],
                    times: SideTimes) -> None:
    drafts_open = drafter_listens = True
    last_verdict = time.perf_counter()  # a block's cycle runs from the verdict before it to its own
    async with verdicts:
        while request.finish_reason is None:
            waited = time.perf_counter()
            flight = None
            if drafts_open:
                try:
                    flight = await flights.receive()
                except anyio.EndOfStream:
                    drafts_open = False  # the drafter is gone: plain decoding from here
            if flight is None:
                block = DraftBlock([], None, len(committed), window.epoch)
                ticket = await verifier.submit(committed, block, defer_bonus=True)
            elif flight.epoch != window.epoch:
                continue  # sent before the last divergence: the verifier dropped it
            else:
                block, ticket = flight.block, flight.ticket
            started = time.perf_counter()
            times.idle += started - waited
            if block.base_length != len(committed):
                raise RuntimeError(f"block extends {block.base_length} tokens but {len(committed)} are committed")
            verdict = await verifier.verdict(ticket, rng)
            verified = time.perf_counter()
            times.busy += verified - started
            emitted = request.finish(verdict.emitted, verdict.logprobs)
            request.verified(block, verdict, emitted, block.draft_seconds, verified - started, drafts_open,
                             cycle_s=verified - last_verdict)
            last_verdict = verified
            committed += emitted
            window.judged(block.k, verdict.diverged, committed)
            await out.send(request.emitted(emitted))
            if drafter_listens:
                try:
                    await verdicts.send(VerdictMessage(window.epoch, emitted, verdict.accepted))
                except anyio.BrokenResourceError:
                    # The drafter failed after sending this block. The blocks it sent before
                    # are still verified, in order (the target's caches already hold them);
                    # plain steps follow when the submitter's stream ends.
                    drafter_listens = False
        verifier.abandon()  # blocks still in flight when the request ended


async def _drafter(request: SpeculativeRequest, proposer: Proposer, committed: list[int],
                   rngs: Callable[[int, int], np.random.Generator], blocks: ObjectSendStream[DraftBlock],
                   verdicts: ObjectReceiveStream[VerdictMessage], times: SideTimes, ahead: int) -> None:
    """Draft up to `ahead` unverified blocks past the committed sequence."""
    rid = request.request_id
    epoch = 0
    sequence = list(committed)  # committed + drafted-but-unverified tokens
    in_flight: list[DraftBlock] = []  # sent, unverified blocks

    def apply(verdict: VerdictMessage) -> None:
        nonlocal epoch, sequence
        committed.extend(verdict.emitted)
        block = in_flight.pop(0)
        if verdict.epoch != epoch:
            epoch = verdict.epoch
            in_flight.clear()
            proposer.accept(rid, len(committed) - len(verdict.emitted) + verdict.accepted)
            sequence = list(committed)
        proposer.verified(rid, block, verdict.accepted, len(committed))

    def drain() -> bool:
        """Apply every verdict that has arrived; True if one moved to a new epoch."""
        before = epoch
        while True:
            try:
                apply(verdicts.receive_nowait())
            except anyio.WouldBlock:
                return epoch != before

    async def plain_step() -> None:
        """One K = 0 block, waited for: with nothing in flight it is the next block."""
        plain = DraftBlock([], None, len(sequence), epoch)
        in_flight.append(plain)
        await blocks.send(plain)
        waited = time.perf_counter()
        while in_flight:
            apply(await verdicts.receive())
        times.idle += time.perf_counter() - waited

    async with blocks, verdicts:
        try:
            while True:
                drain()
                if len(in_flight) >= ahead:
                    waited = time.perf_counter()
                    apply(await verdicts.receive())
                    times.idle += time.perf_counter() - waited
                    continue
                # Drafts past the budget could never be emitted; a deferred bonus needs no room.
                k = request.draft_budget(proposer.limit(request.controller.choose()),
                                         len(sequence) - len(request.prompt), bonus=False)
                if k == 0 and len(sequence) - len(request.prompt) >= request.params.max_tokens:
                    waited = time.perf_counter()
                    apply(await verdicts.receive())  # everything left is in flight: wait for the end
                    times.idle += time.perf_counter() - waited
                    continue
                if k == 0:
                    # Speculation does not pay right now: ask for one plain step and wait for it
                    # rather than burn shared compute and memory bandwidth on doomed drafts.
                    await plain_step()
                    continue
                start_epoch = epoch
                started = time.perf_counter()
                # A verdict that only confirms earlier blocks leaves this one valid; a
                # divergence makes it moot, so stop drafting it at once.
                block = await proposer.propose(rid, sequence, k, request.params, request.config.threshold,
                                               rngs(start_epoch, len(sequence)),
                                               interrupted=drain,
                                               trusted=request.controller.trusted_depth(request.config.threshold))
                block.epoch = start_epoch
                block.draft_seconds = time.perf_counter() - started
                times.busy += block.draft_seconds
                drain()
                if start_epoch != epoch:
                    continue  # overtaken by a divergence while drafting: discard
                if not block.tokens:
                    await plain_step()  # nothing worth drafting here (e.g. no repeat to copy)
                    continue
                request.drafted(block)
                sequence += block.tokens
                in_flight.append(block)
                waited = time.perf_counter()
                await blocks.send(block)
                times.idle += time.perf_counter() - waited
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the verifier finished
        except Exception as exc:
            log.exception("draft model failed in request %s; continuing with plain decoding", rid)
            request.draft_failed(f"draft failed: {exc}")

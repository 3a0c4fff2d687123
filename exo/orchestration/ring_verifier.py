"""The origin's side of a ring request: send blocks into the ring, wait for their verdicts.

`RingVerifier` has the shape of `TargetVerifier` (`prefill`, `submit`, `verdict`), so the
sequential and pipelined schedulers drive a ring exactly as they drive a local target. The
pipelined one submits up to a window of blocks before the first verdict is back, each on the
assumption that those before it are accepted entirely (its bonus deferred); a verdict that
rejects a draft token ends the epoch, and the blocks still in flight are abandoned here
while the stages drop them (see `ring_stage`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import anyio
import numpy as np

from exo.inference.generate import GenerationParams
from exo.networking.grpc_transport import BadMessage
from exo.orchestration import protocol
from exo.orchestration.ring_stage import Background, RingError, Send
from exo.speculative.drafters import DraftBlock
from exo.speculative.events import StageReport
from exo.speculative.verifier import Verdict, block_inputs, expected_cache
from exo.topology.partitioning import Stage

log = logging.getLogger("exo.ring")
RELEASE_WAIT_S = 2.0  # how long a request's end waits for its stages' final reports


@dataclass
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: protocol.Result | None = None


class ResultInbox:
    """Results on their way back to this node, matched to the pass that waits for them."""

    def __init__(self, keep_abandoned: int = 1024) -> None:
        self._waiting: dict[tuple[str, int], _Waiter] = {}
        self._abandoned: OrderedDict[tuple[str, int], None] = OrderedDict()  # blocks no one will wait for
        self._keep_abandoned = keep_abandoned
        self._decoder = protocol.decoder(protocol.Result)
        self.rejected = 0
        self.late = 0  # results of abandoned blocks (the request ended with them in flight)

    def expect(self, request_id: str, seq: int) -> _Waiter:
        waiter = self._waiting[(request_id, seq)] = _Waiter()
        return waiter

    def forget(self, request_id: str, seq: int) -> None:
        self._waiting.pop((request_id, seq), None)

    def abandon(self, request_id: str, seq: int) -> None:
        """Stop waiting for a block that may still be judged (the request ended before its
        verdict): its result, if it comes, is dropped quietly instead of counted as bad."""
        if self._waiting.pop((request_id, seq), None) is not None:
            self._abandoned[(request_id, seq)] = None
            while len(self._abandoned) > self._keep_abandoned:
                self._abandoned.popitem(last=False)

    async def on_result(self, payload: bytes) -> bytes:
        try:
            result = self._decoder.decode(payload)
        except Exception as exc:  # msgspec decode/validation errors
            self.rejected += 1
            raise BadMessage(f"malformed result: {exc}") from None
        key = (result.request_id, result.seq)
        if key in self._abandoned:
            del self._abandoned[key]
            self.late += 1
            return protocol.encode(protocol.Ack())
        waiter = self._waiting.get(key)
        if waiter is None or waiter.result is not None:
            self.rejected += 1  # late (timed out), duplicated or out of order
            log.warning("dropped unexpected result for block %d of request %s from %s",
                        result.seq, result.request_id, result.node_id)
            raise BadMessage(f"no pass waits for block {result.seq} of request {result.request_id}")
        waiter.result = result
        waiter.done.set()
        return protocol.encode(protocol.Ack())


@dataclass
class RingTimes:
    passes: int = 0
    wall: float = 0.0  # from sending a block (or the verdict before it, if later) to its verdict
    max_in_flight: int = 0  # the most blocks the request had in the ring at once
    compute: dict[int, float] = field(default_factory=dict)  # stage index -> seconds

    @property
    def overhead(self) -> float:
        """Network, serialisation and waiting: the part of ring time no stage computed (with
        several blocks in flight their compute overlaps, so this can turn negative)."""
        return self.wall - sum(self.compute.values())

    def summary(self) -> dict:
        return {"passes": self.passes, "max_in_flight": self.max_in_flight, "wall_seconds": self.wall,
                "overhead_seconds": self.overhead,
                "compute_seconds": [self.compute.get(i, 0.0) for i in range(max(self.compute, default=-1) + 1)]}


@dataclass
class _Flight:
    waiter: _Waiter
    sent: float  # perf_counter when it entered the ring


class RingVerifier:
    def __init__(self, node_id: str, send: Send, background: Background, on_report: Callable[[StageReport], None],
                 inbox: ResultInbox, ring: list[Stage], model_id: str, n_layers: int, request_id: str,
                 params: GenerationParams, pass_timeout_s: float, send_timeout_s: float):
        """`background` starts a task in the node's long-lived group; `on_report` takes each
        stage's final report when the request is released."""
        self.node_id, self.send, self.background, self.on_report = node_id, send, background, on_report
        self.inbox, self.ring = inbox, ring
        self.model_id, self.n_layers, self.request_id, self.params = model_id, n_layers, request_id, params
        self.pass_timeout_s, self.send_timeout_s = pass_timeout_s, send_timeout_s
        # Mirrors the last stage's held row (see BlockJudge) after the last block submitted,
        # assuming every block in flight is accepted entirely.
        self.pending = False
        self.epoch = 0  # verdicts that rejected a draft token (the stages' epoch); every header carries it
        self.seq = 0
        self.flights: dict[int, _Flight] = {}  # seq -> block in the ring, oldest first
        self.times = RingTimes()
        self._last_verdict = 0.0
        self._released = protocol.decoder(protocol.Released)

    @property
    def stages(self) -> int:
        return len(self.ring)

    async def prefill(self, prompt: list[int], rng: np.random.Generator) -> Verdict:
        """`rng` is unused: the request's sampling RNG lives on the last stage."""
        await self._send_pass(0, list(prompt), 0, [], None, False)
        result = await self._result(0)
        return Verdict(result.emitted[:1], 0, 0, result.kept, logprobs=result.logprobs)

    async def verify(self, committed: list[int], block: DraftBlock, rng: np.random.Generator,
                     defer_bonus: bool = False) -> Verdict:
        return await self.verdict(await self.submit(committed, block, defer_bonus), rng)

    async def submit(self, committed: list[int], block: DraftBlock, defer_bonus: bool = False) -> int:
        """Send `block` (extending `committed`, which counts the blocks still in flight as
        accepted) into the ring; returns the ticket `verdict` waits on."""
        self.seq += 1
        pending = self.pending
        inputs = [] if pending and not block.tokens else block_inputs(committed, block.tokens, pending)
        # Rows travel only for a sampled draft; at temperature 0 a draft is its argmax, as deterministic
        # as a draft without rows, and the last stage judges both that way.
        sampled = block.tokens and block.probs is not None and self.params.temperature > 0
        probs = protocol.SparseRows.of(block.probs) if sampled else None
        self.pending = bool(block.tokens) and defer_bonus  # what the block leaves held if accepted entirely
        await self._send_pass(expected_cache(len(committed), pending), inputs, len(committed), block.tokens, probs,
                              defer_bonus)
        return self.seq

    async def verdict(self, ticket: int, rng: np.random.Generator | None = None) -> Verdict:
        """The verdict of the oldest block in flight (`rng` unused, as in `prefill`). After one
        that diverges, the blocks behind it are abandoned (the stages drop them, as they are
        of an ended epoch) and must not be waited for."""
        result = await self._result(ticket)
        verdict = Verdict(result.emitted, result.accepted, result.drafted, result.kept, result.deferred,
                          result.logprobs)
        if verdict.accepted < verdict.drafted:
            self.epoch += 1  # the stages trim, and drop the blocks drafted past the rejection
        if verdict.diverged:  # a token the drafter did not propose: nothing in flight is valid
            self.pending = verdict.deferred
            self.abandon()
        return verdict

    def abandon(self) -> None:
        """Stop waiting for every block in flight (their epoch or the request ended)."""
        for seq in self.flights:
            self.inbox.abandon(self.request_id, seq)
        self.flights.clear()

    async def _send_pass(self, start: int, inputs: list[int], n_committed: int, draft_tokens: list[int],
                         probs: protocol.SparseRows | None, defer_bonus: bool) -> None:
        header = protocol.BlockHeader(self.request_id, self.node_id, self.model_id, self.n_layers, self.ring,
                                      self.seq, start, inputs, n_committed, self.params, list(draft_tokens), probs,
                                      defer_bonus, self.epoch)
        hop = 0 if inputs else len(self.ring) - 1  # a held row is sampled by the last stage alone
        seq = self.seq  # state changes before the send: a verdict may end the epoch while it is on its way
        self.flights[seq] = _Flight(self.inbox.expect(self.request_id, seq), time.perf_counter())
        self.times.max_in_flight = max(self.times.max_in_flight, len(self.flights))
        try:
            await self.send(self.ring[hop].node_id, "Forward", protocol.encode(protocol.Forward(header, hop)),
                            self.send_timeout_s)
        except BaseException:
            self.flights.pop(seq, None)
            self.inbox.forget(self.request_id, seq)
            raise

    async def _result(self, seq: int) -> protocol.Result:
        if next(iter(self.flights), None) != seq:
            raise RuntimeError(f"verdict of block {seq} asked out of order (in flight: {list(self.flights)})")
        flight = self.flights[seq]
        try:
            with anyio.move_on_after(self.pass_timeout_s - (time.perf_counter() - flight.sent)):
                await flight.waiter.done.wait()
        finally:
            self.flights.pop(seq, None)
            self.inbox.forget(self.request_id, seq)
        result = flight.waiter.result
        if result is None:
            raise RingError(f"block {seq} of request {self.request_id} got no verdict from the ring "
                            f"({' -> '.join(s.node_id for s in self.ring)}) within {self.pass_timeout_s:.0f} s")
        if result.error:
            raise RingError(f"node {result.node_id} failed block {seq}: {result.error}")
        now = time.perf_counter()
        self.times.passes += 1
        # The part of the ring's time this block alone accounts for: from its entry or the
        # verdict before it, whichever is later (blocks in flight together overlap).
        self.times.wall += now - max(flight.sent, self._last_verdict)
        self._last_verdict = now
        offset = len(self.ring) - len(result.compute)
        for i, seconds in enumerate(result.compute):
            self.times.compute[offset + i] = self.times.compute.get(offset + i, 0.0) + seconds
        return result

    async def close(self) -> None:
        """Free the request on every stage at once; each answers with its final report, so
        they are all in before the request's end is reported. The releases run in the node's
        background group: a dead or stalled stage holds this up for `RELEASE_WAIT_S` at most
        (cancelled or not), and its release still goes out within its send timeout."""
        self.abandon()
        release = protocol.encode(protocol.Release(self.request_id))
        answered = anyio.Event()
        waiting = len(self.ring)

        async def one(stage: Stage) -> None:
            nonlocal waiting
            try:
                reply = self._released.decode(await self.send(stage.node_id, "Release", release,
                                                              self.send_timeout_s))
                if reply.report is not None:
                    self.on_report(reply.report)
            except Exception as exc:  # the stage frees it itself once abandoned (RingTimeouts.abandoned_s)
                log.warning("release of request %s on node %s failed: %s", self.request_id, stage.node_id, exc)
            finally:
                waiting -= 1
                if not waiting:
                    answered.set()

        for stage in self.ring:
            self.background(one, stage)
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_WAIT_S):
            await answered.wait()

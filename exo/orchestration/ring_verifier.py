"""The origin's side of a ring request: send each block into the ring, wait for its verdict.

`RingVerifier` has the same `prefill` / `verify` shape as `TargetVerifier`, so the
sequential and pipelined schedulers drive a ring exactly as they drive a local target:
pipelining then overlaps drafting block n+1 with block n's trip round the ring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio
import numpy as np

from exo.inference.generate import GenerationParams
from exo.networking.grpc_transport import BadMessage
from exo.orchestration import protocol
from exo.orchestration.ring_stage import RingError, Send, Spawn
from exo.speculative.drafters import DraftBlock
from exo.speculative.verifier import Verdict, block_inputs, expected_cache
from exo.topology.partitioning import Stage

log = logging.getLogger("exo.ring")


@dataclass
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: protocol.Result | None = None


class ResultInbox:
    """Results on their way back to this node, matched to the pass that waits for them."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], _Waiter] = {}
        self._decoder = protocol.decoder(protocol.Result)
        self.rejected = 0

    def expect(self, request_id: str, seq: int) -> _Waiter:
        waiter = self._waiting[(request_id, seq)] = _Waiter()
        return waiter

    def forget(self, request_id: str, seq: int) -> None:
        self._waiting.pop((request_id, seq), None)

    async def on_result(self, payload: bytes) -> bytes:
        try:
            result = self._decoder.decode(payload)
        except Exception as exc:  # msgspec decode/validation errors
            self.rejected += 1
            raise BadMessage(f"malformed result: {exc}") from None
        waiter = self._waiting.get((result.request_id, result.seq))
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
    wall: float = 0.0  # from sending a block to its verdict
    compute: dict[int, float] = field(default_factory=dict)  # stage index -> seconds

    @property
    def overhead(self) -> float:
        """Network, serialisation and waiting: the part of ring time no stage computed."""
        return self.wall - sum(self.compute.values())

    def summary(self) -> dict:
        return {"passes": self.passes, "wall_seconds": self.wall, "overhead_seconds": self.overhead,
                "compute_seconds": [self.compute.get(i, 0.0) for i in range(max(self.compute, default=-1) + 1)]}


class RingVerifier:
    def __init__(self, node_id: str, send: Send, spawn: Spawn, inbox: ResultInbox, ring: list[Stage],
                 model_id: str, n_layers: int, request_id: str, params: GenerationParams, pass_timeout_s: float,
                 send_timeout_s: float):
        self.node_id, self.send, self.spawn, self.inbox, self.ring = node_id, send, spawn, inbox, ring
        self.model_id, self.n_layers, self.request_id, self.params = model_id, n_layers, request_id, params
        self.pass_timeout_s, self.send_timeout_s = pass_timeout_s, send_timeout_s
        self.pending = False  # mirrors the last stage's held row (see BlockJudge)
        self.seq = 0
        self.times = RingTimes()

    async def prefill(self, prompt: list[int], rng: np.random.Generator) -> Verdict:
        """`rng` is unused: the request's sampling RNG lives on the last stage."""
        result = await self._pass(0, list(prompt), 0, [], None, False)
        return Verdict(result.emitted[:1], 0, 0, result.kept, logprobs=result.logprobs)

    async def verify(self, committed: list[int], block: DraftBlock, rng: np.random.Generator,
                     defer_bonus: bool = False) -> Verdict:
        self.seq += 1
        inputs = [] if self.pending and not block.tokens else block_inputs(committed, block.tokens, self.pending)
        # Rows travel only for a sampled draft; at temperature 0 a draft is its argmax, as deterministic
        # as a draft without rows, and the last stage judges both that way.
        sampled = block.tokens and block.probs is not None and self.params.temperature > 0
        probs = protocol.SparseRows.of(block.probs) if sampled else None
        result = await self._pass(expected_cache(len(committed), self.pending), inputs, len(committed),
                                  block.tokens, probs, defer_bonus)
        self.pending = result.deferred
        return Verdict(result.emitted, result.accepted, result.drafted, result.kept, result.deferred,
                       result.logprobs)

    async def _pass(self, start: int, inputs: list[int], n_committed: int, draft_tokens: list[int],
                    probs: protocol.SparseRows | None, defer_bonus: bool) -> protocol.Result:
        header = protocol.BlockHeader(self.request_id, self.node_id, self.model_id, self.n_layers, self.ring,
                                      self.seq, start, inputs, n_committed, self.params, list(draft_tokens), probs,
                                      defer_bonus)
        hop = 0 if inputs else len(self.ring) - 1  # a held row is sampled by the last stage alone
        waiter = self.inbox.expect(self.request_id, self.seq)
        started = time.perf_counter()
        try:
            await self.send(self.ring[hop].node_id, "Forward", protocol.encode(protocol.Forward(header, hop)),
                            self.send_timeout_s)
            with anyio.move_on_after(self.pass_timeout_s):
                await waiter.done.wait()
        finally:
            self.inbox.forget(self.request_id, self.seq)
        result = waiter.result
        if result is None:
            raise RingError(f"block {self.seq} of request {self.request_id} got no verdict from the ring "
                            f"({' -> '.join(s.node_id for s in self.ring)}) within {self.pass_timeout_s:.0f} s")
        if result.error:
            raise RingError(f"node {result.node_id} failed block {self.seq}: {result.error}")
        self.times.passes += 1
        self.times.wall += time.perf_counter() - started
        offset = len(self.ring) - len(result.compute)
        for i, seconds in enumerate(result.compute):
            self.times.compute[offset + i] = self.times.compute.get(offset + i, 0.0) + seconds
        return result

    async def close(self) -> None:
        """Free the request on every stage, in the background: a dead or stalled stage must not
        hold up the answer (its sender gives up after its own timeout)."""
        release = protocol.encode(protocol.Release(self.request_id))
        for stage in self.ring:
            self.spawn(stage.node_id, "Release", release)

"""This node's part of every ring request: run its layers, pass the result on, keep KV exact.

A pass (`Forward`) enters the ring at stage 0 and moves stage by stage; the last stage
turns the logits into a verdict (rejection sampling with the request's own RNG, which lives
there) and sends the `Result` to the request's origin.

Several blocks of one request may be in flight (the origin's window): each was drafted on
the assumption that the blocks before it are accepted entirely, so every stage runs them in
order as they come and extends its cache speculatively. A verdict that rejects a draft token
ends the block's *epoch*: the last stage trims its cache, and broadcasts a `KVRollback` that
starts the next epoch to every other stage at once. A stage drops the blocks of an ended
epoch it has not started, discards one whose epoch ended while it ran (its output goes
nowhere), and trims to the committed length. Any other verdict needs no message at all:
every cache already holds exactly what it keeps (a plain ring sends none).

A stage runs a block only when the block's epoch is the stage's and its cache holds exactly
the header's base length; a longer cache, or a wait longer than `rollback_wait_s` for the
blocks or rollback before it, fails the request loudly instead of attending to the wrong
context. Rollbacks apply in epoch order whatever order they arrive in (at most
`MAX_EARLY_ROLLBACKS` held), never while a pass of the request runs on the engine's thread,
and the last stage sends each peer a request's rollbacks one after the other.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import anyio
import msgspec
import numpy as np
from anyio.abc import TaskGroup

from exo.inference.engine import InferenceEngine, last_only
from exo.inference.sampling import judge_rng
from exo.inference.shard import Shard
from exo.inference.tensor_bytes import TensorBytes
from exo.networking.grpc_transport import BadMessage
from exo.orchestration import protocol
from exo.speculative.events import EventBus, EventCodec, KVRollback, StageReport
from exo.speculative.kv import KVRollbackError, rollback_to
from exo.speculative.verifier import BlockJudge

log = logging.getLogger("exo.ring")
Send = Callable[[str, str, bytes, float], Awaitable[bytes]]  # (node id, method, payload, timeout)
Background = Callable[..., None]  # (async function, *args): run it in the node's long-lived group
MAX_EARLY_ROLLBACKS = 8  # rollbacks held for later blocks while an earlier one is missing


class RingError(RuntimeError):
    """A ring request cannot go on: a stage failed, is unreachable, or its KV would be wrong."""


@dataclass(frozen=True)
class RingTimeouts:
    send_s: float = 10.0  # one message to a peer (it only queues work before answering)
    rollback_wait_s: float = 10.0  # how long a stage waits for the previous block's KVRollback
    prepare_s: float = 900.0  # loading a stage's layers (may fetch and convert weights)
    abandoned_s: float = 600.0  # a request untouched this long lost its origin: free it


@dataclass
class StageState:
    shard: Shard
    origin: str
    judge: BlockJudge | None = None  # last stage only
    rng: np.random.Generator | None = None  # last stage only: the request's sampling RNG
    epoch: int = 0  # epochs ended so far (rollbacks applied; on the last stage, verdicts that rejected a draft)
    running: bool = False  # a pass of this request is on the engine's thread (no trim meanwhile)
    early: dict[int, KVRollback] = field(default_factory=dict)  # epoch -> rollback not applied yet
    senders: dict[str, anyio.Lock] = field(default_factory=dict)  # peer -> lock that keeps its rollbacks in order
    failed: str = ""
    forwards: int = 0
    forward_seconds: float = 0.0
    tokens: int = 0
    dropped: int = 0  # blocks of an ended epoch never computed here
    discarded: int = 0  # blocks whose epoch ended while this stage computed them
    discarded_seconds: float = 0.0
    messages: int = 0  # sent for this request, and their bytes
    bytes_sent: int = 0
    touched: float = field(default_factory=time.monotonic)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def sent(self, payload: bytes) -> bytes:
        self.messages, self.bytes_sent = self.messages + 1, self.bytes_sent + len(payload)
        return payload


class StageReports:
    """What every stage reported to this (origin) node: cluster-wide metrics, recent requests."""

    def __init__(self, keep_requests: int = 16):
        self.latest: dict[str, StageReport] = {}  # node id -> its last report
        self.requests: OrderedDict[str, list[StageReport]] = OrderedDict()
        self.keep_requests = keep_requests

    def record(self, report: StageReport) -> None:
        previous = self.latest.get(report.node_id)
        if previous is not None and previous.request_id == report.request_id and previous.block < 0:
            return  # a late rollback report of a request whose final totals are in: they stay
        self.latest[report.node_id] = report
        self.requests.setdefault(report.request_id, []).append(report)
        self.requests.move_to_end(report.request_id)
        while len(self.requests) > self.keep_requests:
            self.requests.popitem(last=False)

    def offsets(self, request_id: str) -> dict[str, dict[int, int]]:
        """node id -> {block: cache offset after that block's rollback}."""
        out: dict[str, dict[int, int]] = {}
        for report in self.requests.get(request_id, []):
            if report.block >= 0:
                out.setdefault(report.node_id, {})[report.block] = report.cache_offset
        return out

    def totals(self, request_id: str) -> dict[str, dict]:
        """node id -> its latest counters for the request (final once it reported its release;
        a final report is never overridden by a rollback's that arrived after it)."""
        latest: dict[str, StageReport] = {}
        for r in self.requests.get(request_id, []):
            if r.node_id not in latest or latest[r.node_id].block >= 0:
                latest[r.node_id] = r
        return {node: {"final": r.block < 0, "forwards": r.forwards, "forward_seconds": r.forward_seconds,
                       "tokens": r.tokens, "epochs": r.epoch, "dropped": r.dropped, "discarded": r.discarded,
                       "discarded_seconds": r.discarded_seconds, "messages": r.messages,
                       "bytes_sent": r.bytes_sent}
                for node, r in sorted(latest.items())}

    def snapshot(self) -> dict:
        return {"nodes": {node: {"shard": r.shard, "last_request": r.request_id, "forwards": r.forwards,
                                 "forward_seconds": r.forward_seconds, "tokens": r.tokens}
                          for node, r in sorted(self.latest.items())},
                "requests": {rid: {node: {str(b): o for b, o in blocks.items()}
                                   for node, blocks in self.offsets(rid).items()}
                             for rid in self.requests},
                "stages": {rid: self.totals(rid) for rid in self.requests}}


class RingStage:
    """The handlers a ring member serves (Forward, Event, Release) and the passes they start."""

    def __init__(self, node_id: str, engine: InferenceEngine, send: Send, events: EventBus,
                 timeouts: RingTimeouts = RingTimeouts()):
        self.id, self.engine, self.send, self.events, self.timeouts = node_id, engine, send, events, timeouts
        self.states: dict[str, StageState] = {}
        self.released: deque[str] = deque(maxlen=256)  # a last block's rollback may arrive after release
        self.reports = StageReports()
        self.codec = EventCodec()
        self.rejected = 0  # protocol violations: out-of-order or unexpected messages
        self.early_rollbacks = 0  # rollbacks that arrived before an earlier epoch's (held, then applied)
        self.dropped = self.discarded = 0  # blocks of ended epochs, over all requests (see StageState)
        self.group: TaskGroup | None = None  # the node's long-lived task group, set while serving
        self._forward = protocol.decoder(protocol.Forward)
        self._release = protocol.decoder(protocol.Release)

    # -- handlers (bytes in, bytes out) ----------------------------------------------------
    async def load_stage(self, prepare: protocol.Prepare) -> None:
        stage = next((s for s in prepare.ring if s.node_id == self.id), None)
        if stage is None:
            raise BadMessage(f"node {self.id} is not in the ring it was asked to prepare")
        await self.engine.ensure_shard(Shard(prepare.model_id, stage.start_layer, stage.end_layer, prepare.n_layers))

    async def on_forward(self, payload: bytes) -> bytes:
        """Queue the pass and answer at once: the predecessor must not wait for our compute."""
        forward = decode_message(self._forward, payload)
        header = forward.header
        if header.version != protocol.WIRE_VERSION:
            raise BadMessage(f"block of wire version {header.version} sent to node {self.id}, which speaks "
                             f"{protocol.WIRE_VERSION}: run the same exo version on every node")
        if not 0 <= forward.hop < len(header.ring) or header.ring[forward.hop].node_id != self.id:
            raise BadMessage(f"pass for stage {forward.hop} of request {header.request_id} sent to node {self.id}")
        if self.group is None:
            raise RingError(f"node {self.id} is not serving")
        self.group.start_soon(self._run_pass, forward)
        return protocol.encode(protocol.Ack())

    async def on_event(self, payload: bytes) -> bytes:
        event = self.codec.decode(payload)
        if event is None:
            raise BadMessage("malformed event")
        if isinstance(event, KVRollback) and event.epoch > 0:
            self._apply_rollback(event)
            return protocol.encode(protocol.Ack())
        if isinstance(event, StageReport):
            self.accept_report(event)
            return protocol.encode(protocol.Ack())
        self.events.publish(event)
        return protocol.encode(protocol.Ack())

    def accept_report(self, report: StageReport) -> None:
        """A stage's report reached this (origin) node: kept for the metrics, and published."""
        self.reports.record(report)
        self.events.publish(report)

    async def on_release(self, payload: bytes) -> bytes:
        """Free the request; the reply carries this stage's final totals for its origin."""
        request_id = decode_message(self._release, payload).request_id
        state = self.states.get(request_id)
        final = self._stage_report(state, -1, request_id) if state is not None else None
        self.release(request_id)
        return protocol.encode(protocol.Released(final))

    def release(self, request_id: str) -> None:
        """Free the request (a pass still running for it is discarded when it ends)."""
        state = self.states.pop(request_id, None)
        self.released.append(request_id)
        if state is not None:
            state.failed = state.failed or "request released"
            state.notify()
        self.engine.free_cache(request_id)

    # -- one pass through this stage --------------------------------------------------------
    async def _run_pass(self, forward: protocol.Forward) -> None:
        header = forward.header
        try:
            await self._compute(forward)
        except Exception as exc:  # reported to the origin, which fails the request with it
            log.warning("node %s: block %d of request %s failed: %s", self.id, header.seq, header.request_id, exc)
            result = protocol.Result(header.request_id, header.seq, self.id, error=f"{type(exc).__name__}: {exc}")
            await self._deliver(header.origin, "Result", protocol.encode(result))

    async def _compute(self, forward: protocol.Forward) -> None:
        header, rid = forward.header, forward.header.request_id
        stage = header.ring[forward.hop]
        last = forward.hop == len(header.ring) - 1
        state = self._new_state(forward, last) if header.seq == 0 else await self._turn(forward)
        if state is None:
            return  # dropped unseen: its epoch ended, or the request did
        if forward.hidden is not None:
            x = forward.hidden.array()
        elif forward.hop == 0 and header.inputs:
            x = np.asarray([header.inputs])
        elif last and not header.inputs:
            x = None  # only the held target row is sampled
        else:
            raise BadMessage(f"stage {forward.hop} of request {rid} got no input")
        out, seconds = None, 0.0
        if x is not None:
            started = time.perf_counter()
            rows = last_only(len(header.inputs) if header.seq else 1) if last else None
            state.running = True
            try:
                out, _ = await self.engine.infer_tensor(rid, state.shard, x, rows)
            finally:
                state.running = False
                self._apply_early(state)  # rollbacks that arrived while it ran
                state.notify()
            seconds = time.perf_counter() - started
            state.forwards, state.forward_seconds, state.tokens = (
                state.forwards + 1, state.forward_seconds + seconds, state.tokens + x.shape[1])
            if header.epoch < state.epoch or self.states.get(rid) is not state:
                state.discarded, state.discarded_seconds = state.discarded + 1, state.discarded_seconds + seconds
                self.discarded += 1
                return  # its epoch (or the request) ended while it ran: the output is moot
        compute = [*forward.compute, seconds]
        if not last:
            next_stage = header.ring[forward.hop + 1]
            message = protocol.Forward(header, forward.hop + 1, TensorBytes.of(out), compute)
            await self.send(next_stage.node_id, "Forward", state.sent(protocol.encode(message)),
                            self.timeouts.send_s)
            return
        result = self._judge(header, state, out, compute)
        if result.accepted < result.drafted:  # a draft token was rejected: the epoch ends
            state.epoch += 1
            state.notify()
            rollback = KVRollback(request_id=rid, node_id=self.id, timestamp=time.time(),
                                  shard=_label(stage, header), keep_tokens=result.kept, block=header.seq,
                                  epoch=state.epoch)
            payload = self.codec.encode(rollback)
            for other in sorted({s.node_id for s in header.ring} - {self.id}):
                self._spawn_in_order(state, other, "Event", payload)
            self._report(state, header.seq, rid)
        await self._deliver(header.origin, "Result", state.sent(protocol.encode(result)))

    def _new_state(self, forward: protocol.Forward, last: bool) -> StageState:
        header, rid = forward.header, forward.header.request_id
        stage = header.ring[forward.hop]
        self._release_abandoned()
        self.release(rid)  # a reused id starts from nothing
        shard = Shard(header.model_id, stage.start_layer, stage.end_layer, header.n_layers)
        state = StageState(shard, header.origin)
        if last:
            state.judge, state.rng = BlockJudge(header.params), judge_rng(header.params.seed)
        self.states[rid] = state
        held = self.engine.cache_offset(rid)
        if held != header.start:
            raise RingError(f"node {self.id}: cache of request {rid} holds {held} tokens, "
                            f"its prompt expects {header.start}")
        return state

    async def _turn(self, forward: protocol.Forward) -> StageState | None:
        """Wait until the block can run here: its epoch is this stage's, no other pass of the
        request runs, and the cache holds exactly its base length (the blocks before it have
        run). None: drop it unseen (its epoch, or the request, has ended)."""
        header, rid = forward.header, forward.header.request_id
        state = self.states.get(rid)
        if state is None:
            if rid in self.released:
                return None  # the request ended while this block was on its way
            raise RingError(f"node {self.id} holds no state for request {rid} (released, or its prompt never came)")
        state.touched = time.monotonic()
        held = self.engine.cache_offset(rid)
        with anyio.move_on_after(self.timeouts.rollback_wait_s):
            while True:
                if self.states.get(rid) is not state:
                    return None  # released meanwhile
                if state.failed:
                    raise RingError(f"node {self.id}: {state.failed}")
                if header.epoch < state.epoch:
                    state.dropped += 1
                    self.dropped += 1
                    return None
                if header.epoch == state.epoch and not state.running:
                    held = self.engine.cache_offset(rid)
                    if held == header.start:
                        return state
                    if held > header.start:
                        raise RingError(f"node {self.id}: cache of request {rid} holds {held} tokens, "
                                        f"block {header.seq} expects {header.start}")
                await state.changed.wait()
        if header.epoch > state.epoch:
            raise RingError(f"node {self.id}: no KVRollback for epoch {header.epoch} of request {rid} within "
                            f"{self.timeouts.rollback_wait_s:.0f} s (at epoch {state.epoch}); "
                            f"refusing block {header.seq}")
        raise RingError(f"node {self.id}: cache of request {rid} holds {held} tokens, block {header.seq} "
                        f"expects {header.start}; the blocks before it did not come within "
                        f"{self.timeouts.rollback_wait_s:.0f} s")

    def _judge(self, header: protocol.BlockHeader, state: StageState, out: np.ndarray | None,
               compute: list[float]) -> protocol.Result:
        assert state.judge is not None and state.rng is not None
        rid = header.request_id
        if header.seq == 0:
            first = state.judge.first(out[0, -1], state.rng, len(header.inputs))
            return protocol.Result(rid, 0, self.id, first.emitted, kept=first.kept, compute=compute,
                                   logprobs=first.logprobs)
        logits = None if out is None else out[0]
        probs = header.draft_probs.array() if header.draft_probs is not None else None  # None: deterministic
        verdict = state.judge.judge(logits, header.n_committed, header.draft_tokens, probs, state.rng,
                                    header.defer_bonus)
        rollback_to(self.engine, rid, verdict.kept)
        return protocol.Result(rid, header.seq, self.id, verdict.emitted, verdict.accepted, verdict.drafted,
                               verdict.kept, verdict.deferred, compute, logprobs=verdict.logprobs)

    def _release_abandoned(self) -> None:
        """Free requests whose origin never released them (it died, or this node was stalled
        while the release was sent), so their caches do not pile up."""
        cutoff = time.monotonic() - self.timeouts.abandoned_s
        for rid in [rid for rid, state in self.states.items() if state.touched < cutoff]:
            log.warning("node %s: releasing request %s, untouched for %.0f s", self.id, rid,
                        self.timeouts.abandoned_s)
            self.release(rid)

    # -- rollbacks announced by the last stage ----------------------------------------------
    def _apply_rollback(self, event: KVRollback) -> None:
        state = self.states.get(event.request_id)
        if state is None and event.request_id in self.released:
            return
        if state is None:
            self.rejected += 1
            log.warning("node %s: KVRollback for unknown request %s dropped", self.id, event.request_id)
            return
        if state.failed:
            return
        if event.epoch <= state.epoch or event.epoch in state.early:
            self.rejected += 1
            state.failed = (f"KVRollback for epoch {event.epoch} arrived at epoch {state.epoch}: "
                            f"out of order (duplicate or stale)")
        elif len(state.early) >= MAX_EARLY_ROLLBACKS:
            self.rejected += 1
            state.failed = (f"KVRollback for epoch {event.epoch} arrived while epoch {state.epoch + 1}'s "
                            f"is still missing and {len(state.early)} later ones wait: out of order")
        else:
            state.early[event.epoch] = event
            if event.epoch > state.epoch + 1:
                self.early_rollbacks += 1  # held until the epochs before it have ended here
            self._apply_early(state)
        state.notify()

    def _apply_early(self, state: StageState) -> None:
        """Apply every held rollback that is next in epoch order, unless a pass is running."""
        while not state.running and not state.failed and state.epoch + 1 in state.early:
            event = state.early.pop(state.epoch + 1)
            try:
                rollback_to(self.engine, event.request_id, event.keep_tokens)
            except KVRollbackError as exc:
                state.failed = str(exc)
                return
            state.epoch = event.epoch
            self._report(state, event.block, event.request_id)

    def _report(self, state: StageState, block: int, request_id: str) -> None:
        """Tell the origin where this stage's cache stands after a rollback (in the background)."""
        report = self._stage_report(state, block, request_id)
        if state.origin == self.id:
            self.accept_report(report)
        else:
            self.spawn(state.origin, "Event", state.sent(self.codec.encode(report)))

    def _stage_report(self, state: StageState, block: int, request_id: str) -> StageReport:
        return StageReport(request_id=request_id, node_id=self.id, timestamp=time.time(),
                           shard=f"{state.shard.model_id}:{state.shard.start_layer}-{state.shard.end_layer}",
                           block=block, cache_offset=self.engine.cache_offset(request_id),
                           forwards=state.forwards, forward_seconds=state.forward_seconds, tokens=state.tokens,
                           epoch=state.epoch, dropped=state.dropped, discarded=state.discarded,
                           discarded_seconds=state.discarded_seconds, messages=state.messages,
                           bytes_sent=state.bytes_sent)

    # -- sending ------------------------------------------------------------------------------
    def _spawn_in_order(self, state: StageState, node_id: str, method: str, payload: bytes) -> None:
        """Send in the background, after every earlier message of this request to that peer
        (tasks start in spawn order and the lock queues them first come, first served)."""
        if self.group is None:
            log.warning("node %s is not serving: %s to %s not sent", self.id, method, node_id)
            return
        lock = state.senders.setdefault(node_id, anyio.Lock())

        state.sent(payload)

        async def deliver() -> None:
            async with lock:
                await self._deliver(node_id, method, payload)

        self.group.start_soon(deliver)

    def spawn(self, node_id: str, method: str, payload: bytes) -> None:
        """Send in the background (events must not hold up the critical path)."""
        self.background(self._deliver, node_id, method, payload)

    def background(self, fn: Callable[..., Awaitable[None]], *args) -> None:
        """Run `fn(*args)` in the node's long-lived task group (failures are its own to log)."""
        if self.group is None:
            log.warning("node %s is not serving: %s not started", self.id, getattr(fn, "__name__", fn))
            return
        self.group.start_soon(fn, *args)

    async def _deliver(self, node_id: str, method: str, payload: bytes) -> None:
        try:
            await self.send(node_id, method, payload, self.timeouts.send_s)
        except Exception as exc:  # the receiver notices what is missing (timeouts) and fails loudly
            log.warning("node %s: %s to %s failed: %s", self.id, method, node_id, exc)


def decode_message(decoder: msgspec.msgpack.Decoder, payload: bytes):
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadMessage(str(exc)) from None


def _label(stage, header: protocol.BlockHeader) -> str:
    return f"{header.model_id}:{stage.start_layer}-{stage.end_layer}"

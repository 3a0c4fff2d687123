"""An Exo node: requests in, tokens out, events to subscribers.

Alone, a node runs the whole target itself. With peers (a `Cluster`), the target's layers
are split over the ring and each block is verified in one pass round it. The draft and the
scheduler run on one node, the draft node (by default the one holding layer 0, else
`draft_node`); a request that reaches the API of another node is streamed from there.

Upstream-compatible in spirit: `process_prompt` / `process_tensor`, per-request token
buffers, `on_token(request_id, tokens, is_finished)` callbacks (several tokens per call
when a speculative block verifies several), and `broadcast_opaque_status`. The API drives
`generate`, an async context manager whose stream of blocks stops (and frees caches) when
its consumer leaves it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict, deque
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import anyio
import msgspec
import numpy as np

from exo.inference.batching import DEFAULT_MAX_BATCH
from exo.inference.cache_table import DEFAULT_CAPACITY, CacheTableFull
from exo.inference.engine import InferenceEngine
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.inference.sources import ModelStore
from exo.models import ModelRegistry, UnknownModelError
from exo.orchestration import counters as status
from exo.orchestration import protocol
from exo.orchestration.admission import (MAX_AUTO_LIVE, QUEUE_FULL, QUEUE_TIMEOUT, AdmissionGate,
                                         AdmissionRejected, available_memory, max_live_from_memory)
from exo.orchestration.cluster import Cluster
from exo.orchestration.counters import NodeCounters
from exo.orchestration.ring_stage import RingError, decode_message
from exo.orchestration.ring_verifier import RingVerifier
from exo.speculative.config import AUTO, DRAFT_PAIRS, ConfigError, SpeculativeConfig, choose_draft
from exo.speculative.engine import DraftBusy, SpeculativeInferenceEngine, wants_draft_model
from exo.speculative.events import EventBus
from exo.speculative.metrics import MetricsSnapshot
from exo.speculative.pipeline.common import Emitted
from exo.topology.partitioning import Stage

log = logging.getLogger("exo.node")


STATUS_TIMEOUT_S = 15.0
CONTEXT_BUDGET_TOKENS = 4096  # the context a request is assumed to fill when sizing the default limit
CACHE_FULL = "cache_full"  # an engine refused a request: its cache table was full of live ones
DRAFT_BUSY = "draft_busy"  # its draft model could not be swapped in: another stayed in use too long


class ModelNotOnDisk(UnknownModelError):
    """A client named a model this node would have to fetch, and clients may not make it fetch."""


class RequestOutcome(msgspec.Struct, frozen=True):
    finish_reason: str | None
    metrics: MetricsSnapshot | None


TokenCallback = Callable[[str, list[int], bool], None]
StatusCallback = Callable[[str, str], None]
REFUSALS = (QUEUE_FULL, QUEUE_TIMEOUT, DRAFT_BUSY)


class Node:
    def __init__(self, node_id: str, engine_pair: Callable[[], tuple[InferenceEngine, InferenceEngine]],
                 config: SpeculativeConfig, default_model: str, *, max_generate_tokens: int = 1024,
                 default_temperature: float = 0.0, recent_window: int = 32,
                 cluster: Callable[[InferenceEngine, EventBus], Cluster] | None = None,
                 pass_timeout_s: float = 60.0, draft_node: str | None = None,
                 max_concurrent_requests: int | None = None, max_queued_requests: int = 64,
                 queue_timeout_s: float = 60.0, models: ModelRegistry | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH, allow_model_downloads: bool = False):
        """`max_concurrent_requests`: live requests at once (None: sized from free memory when
        a model loads, see `admission.max_live_from_memory`); more wait, up to
        `max_queued_requests` of them and `queue_timeout_s` each. `max_batch_size`: requests
        whose steps share one forward pass per engine (1: none do). `allow_model_downloads`:
        a request may name (as target or draft) a card whose weights are not on disk yet and
        make the node fetch it; otherwise only models on disk and the operator's own."""
        self.id = node_id
        # What clients may name: the cards, the operator's own default and draft, and `models`.
        self.models = models or ModelRegistry()
        own_draft = choose_draft(default_model, config.draft_model) if (
            config.draft_model != AUTO or default_model in DRAFT_PAIRS) else AUTO
        for model_id in (default_model, config.draft_model, own_draft):
            if model_id != AUTO:
                self.models.add(model_id, model_id)
        self.allow_model_downloads = allow_model_downloads
        self._context: dict[str, int | None] = {}
        self.config = config
        self.default_model = default_model
        self.max_generate_tokens = max_generate_tokens
        self.default_temperature = default_temperature
        self.events = EventBus()
        self.engine = SpeculativeInferenceEngine(*engine_pair(), config, events=self.events, node_id=node_id)
        self.engine.set_max_batch(max_batch_size)
        self.buffered_token_output: dict[str, tuple[list[int], bool]] = {}
        self.on_token: list[TokenCallback] = []
        self.on_opaque_status: list[StatusCallback] = []
        self.recent: deque[dict] = deque(maxlen=recent_window)
        self.counters = NodeCounters()
        self._auto_limit = max_concurrent_requests is None
        self.admission = AdmissionGate(max_concurrent_requests or DEFAULT_CAPACITY, max_queued_requests,
                                       queue_timeout_s)
        self._model_lock = anyio.Lock()  # serialises model switches
        self._active = 0
        self._idle = anyio.Condition()
        self._shard: Shard | None = None
        self._ring: list[Stage] | None = None  # None: the whole target runs here
        self._full_shards: dict[str, Shard] = {}
        self.cluster = cluster(self.engine.target, self.events) if cluster is not None else None
        if self.cluster is not None:
            self.cluster.streams["Generate"] = self._serve_generate
            self.cluster.handlers["Status"] = self._on_status
        self.pass_timeout_s = pass_timeout_s
        self.draft_node = draft_node
        self.remote_outcomes: OrderedDict[str, RequestOutcome] = OrderedDict()  # requests served elsewhere
        self._generate_decoder = protocol.decoder(protocol.GenerateRequest)
        self._chunk_decoder = protocol.decoder(protocol.GenerateChunk)
        self._status_decoder = protocol.decoder(protocol.OpaqueStatus)
        self._size_caches()

    # -- models --------------------------------------------------------------------------
    async def check_servable(self, model_id: str) -> None:
        """ModelNotOnDisk unless `model_id` is the operator's, on disk already, or clients may
        make this node fetch models: a request must not be able to start a download (of up
        to a 70B model) or fill the disk."""
        if self.allow_model_downloads or model_id in self.models.registered or model_id in self._full_shards:
            return
        if not await anyio.to_thread.run_sync(ModelStore().installed, model_id):
            raise ModelNotOnDisk(f"model {model_id!r} is not on this node's disk, and this node does not fetch "
                                 "models for clients (its operator can fetch it, or allow client-triggered "
                                 "downloads with --allow-model-downloads)")

    async def shard_for(self, model_id: str | None) -> Shard:
        """Load `model_id` here or over the ring (waiting for in-flight requests on another
        model or another ring to finish); ModelNotOnDisk as in `check_servable`."""
        model_id = model_id or self.default_model
        await self.check_servable(model_id)
        async with self._model_lock:
            shard = self._full_shards.get(model_id) or await self.engine.full_shard(model_id)
            self._full_shards[model_id] = shard
            ring = self.cluster.ring(shard.n_layers) if self.cluster is not None and self.cluster.peers else None
            if self._shard != shard or ring != self._ring:
                async with self._idle:
                    while self._active:
                        await self._idle.wait()
                previous, self._shard, self._ring = self._shard, None, None
                if self._auto_limit and previous != shard:
                    await self._size_admission(model_id)
                self._size_caches(ring is not None)
                if ring is None:
                    await self.engine.target.ensure_shard(shard)
                else:
                    await self.cluster.prepare(model_id, shard.n_layers, ring)
                self._shard, self._ring = shard, ring
            return self._shard

    async def _size_admission(self, model_id: str) -> None:
        """The default limit: as many requests as fit their KV caches in half the free memory."""
        model_dir = await anyio.to_thread.run_sync(self.engine.model_dir_for, model_id)
        model_config = json.loads(await anyio.Path(model_dir, "config.json").read_text())
        context = min(int(model_config.get("max_position_embeddings") or CONTEXT_BUDGET_TOKENS),
                      CONTEXT_BUDGET_TOKENS)
        limit = max_live_from_memory(model_config, context, available_memory())
        if limit != self.admission.max_live:
            log.info("%s: at most %d concurrent requests (KV caches of %d tokens in half the free memory)",
                     model_id, limit, context)
        self.set_max_concurrent_requests(limit)

    def set_max_concurrent_requests(self, limit: int) -> None:
        """Change the admission limit; the engines' cache tables follow it."""
        self.admission.resize(limit)
        self._size_caches(self._ring is not None)

    def _size_caches(self, in_ring: bool | None = None) -> None:
        """Bound the engines' cache tables by the admission limit. A ring stage also holds the
        requests the draft node admits: with the default (memory-sized) limit, which is at
        most MAX_AUTO_LIVE on any node, it keeps room for that many; an explicit limit is
        taken as this node's (give every node of a ring the same one)."""
        if in_ring is None:  # not loaded here yet: may serve as another node's stage
            in_ring = self.cluster is not None
        capacity = self.admission.max_live
        if in_ring and self._auto_limit:
            capacity = max(capacity, MAX_AUTO_LIVE)
        self.engine.set_cache_policy(capacity, self._is_live)

    def _is_live(self, request_id: str) -> bool:
        """A request whose KV cache must stay: admitted here, or a ring stage's request."""
        if self.admission.holds(request_id):
            return True
        return self.cluster is not None and request_id in self.cluster.member.states

    def live_requests(self) -> list[str]:
        """Requests generating on (or through) this node now, and those whose KV its ring stage holds."""
        staged = self.cluster.member.states if self.cluster is not None else ()
        return sorted(set(self.admission.live) | set(staged))

    @asynccontextmanager
    async def admit(self, request_id: str) -> AsyncIterator[None]:
        """Hold an admission slot for `request_id` (waiting in line; AdmissionRejected if the
        queue is full or the wait too long). Re-entrant: inside, `generate` takes no second slot."""
        if self.admission.holds(request_id):
            yield
            return
        try:
            await self.admission.acquire(request_id)
        except AdmissionRejected as exc:
            self.counters.reject(exc.reason)
            raise
        try:
            yield
        finally:
            self.admission.release(request_id)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def loaded_model(self) -> str | None:
        """The model id this node (or its ring) serves right now."""
        return self._shard.model_id if self._shard else None

    async def context_length(self, model_id: str) -> int | None:
        """Positions (prompt + completion) a request on `model_id` may use here."""
        if model_id not in self._context:
            self._context[model_id] = await self.engine.target.context_length(model_id)
        return self._context[model_id]

    async def check_draft(self, model_id: str, config: SpeculativeConfig) -> None:
        """Load a draft a request asked for, now: ConfigError if it is unusable, before any
        token is sent (only where this node schedules; a peer reports it in its stream)."""
        if not (config.enabled and self.engine.draft_is_requested(config) and wants_draft_model(config, model_id)):
            return
        try:
            await self.check_servable(choose_draft(model_id, config.draft_model))
        except ModelNotOnDisk as exc:
            raise ConfigError(f"speculative.draft_model: {exc}") from exc
        if self.scheduler_node() == self.id:
            try:
                await self.engine.ensure_draft(model_id, config.draft_model, strict=True)
            except DraftBusy as exc:
                self.counters.reject(DRAFT_BUSY)
                raise AdmissionRejected(DRAFT_BUSY, str(exc), exc.retry_after_s) from exc

    # -- generation ----------------------------------------------------------------------
    @asynccontextmanager
    async def generate(self, model_id: str | None, prompt: list[int], params: GenerationParams,
                       config: SpeculativeConfig | None = None, request_id: str | None = None,
                       here: bool = False, slot: str | None = None) -> AsyncIterator[AsyncIterator[Emitted]]:
        """The request's verified blocks while the `async with` is open; leaving it stops the
        request wherever it runs (the scheduler's tasks live in this context, not in a
        generator). `here`: schedule on this node whatever the ring says (a peer forwarded the
        request to us; sending it on could loop). `slot`: the request id whose admission slot
        this generation runs under (a stream's choices, one after another, share their
        response's slot).

            async with node.generate(model_id, prompt, params) as blocks:
                async for block in blocks: ...
        """
        request_id = request_id or uuid.uuid4().hex
        shard = await self.shard_for(model_id)
        config = config or self.config
        async with self.admit(slot or request_id):
            self._active += 1
            self.counters.prompt_tokens += len(prompt)
            outcome = status.STOPPED  # unless the stream is read to its end or fails below
            exhausted = False

            async def relay(blocks: AsyncIterator[Emitted]) -> AsyncIterator[Emitted]:
                nonlocal exhausted
                async for block in blocks:
                    self._fire_tokens(request_id, block.tokens, block.finish_reason is not None)
                    self.counters.generated_tokens += len(block.tokens)
                    yield block
                exhausted = True

            try:
                scheduler = self.id if here else self.scheduler_node()
                source = (self._generate_here(shard, prompt, params, config, request_id) if scheduler == self.id
                          else aclosing(self._generate_on(scheduler, shard, prompt, params, config, request_id)))
                async with source as blocks, aclosing(relay(blocks)) as relayed:
                    yield relayed
                if exhausted:
                    outcome = status.COMPLETED
            except anyio.get_cancelled_exc_class():
                outcome = status.CANCELLED
                raise
            except CacheTableFull:
                outcome = status.FAILED
                self.counters.rejected[CACHE_FULL] += 1
                raise
            except AdmissionRejected as exc:  # refused by the draft node this request went to
                outcome = status.REJECTED
                self.counters.rejected[exc.reason] += 1
                raise
            except DraftBusy as exc:  # its draft could not be swapped in while others used another
                outcome = status.REJECTED
                self.counters.rejected[DRAFT_BUSY] += 1
                raise AdmissionRejected(DRAFT_BUSY, str(exc), exc.retry_after_s) from exc
            except Exception:
                outcome = status.FAILED
                raise
            finally:
                self.counters.finish(outcome)
                self.buffered_token_output.pop(request_id, None)
                self._active -= 1
                async with self._idle:
                    self._idle.notify_all()

    def scheduler_node(self) -> str:
        """Where the draft and the scheduler run: this node when alone, else the draft node."""
        if self._ring is None:
            return self.id
        members = [stage.node_id for stage in self._ring]
        return self.draft_node if self.draft_node in members else members[0]

    @asynccontextmanager
    async def _generate_here(self, shard: Shard, prompt: list[int], params: GenerationParams,
                             config: SpeculativeConfig, request_id: str) -> AsyncIterator[AsyncIterator[Emitted]]:
        verifier = None
        if self._ring is not None and self.cluster is not None:
            cluster = self.cluster
            verifier = RingVerifier(self.id, cluster.call, cluster.member.background, cluster.member.accept_report,
                                    cluster.inbox, self._ring, shard.model_id, shard.n_layers, request_id, params,
                                    self.pass_timeout_s, cluster.timeouts.send_s)
        try:
            async with self.engine.generate(shard, prompt, params, config, request_id, verifier=verifier) as blocks:
                yield blocks
        finally:  # counted however the request ended
            request = self.engine.requests.get(request_id)
            if request is not None:
                for drafter, counts in request.metrics.per_drafter.items():
                    if drafter != "none":
                        self.counters.speculation(drafter, counts.drafted, counts.accepted)
            if verifier is not None:
                times = verifier.times
                self.counters.ring(times.passes, times.wall,
                                   [times.compute.get(i, 0.0) for i in range(len(verifier.ring))])
        request = self.engine.requests[request_id]
        entry = {"request_id": request_id, "model": shard.model_id,
                 **msgspec.to_builtins(self.engine.request_metrics(request))}
        if verifier is not None:
            entry["ring"] = {"stages": [msgspec.to_builtins(s) for s in verifier.ring], **verifier.times.summary(),
                             "stage_totals": self.cluster.member.reports.totals(request_id)}
        self.recent.append(entry)

    async def _generate_on(self, scheduler: str, shard: Shard, prompt: list[int], params: GenerationParams,
                           config: SpeculativeConfig, request_id: str) -> AsyncIterator[Emitted]:
        assert self.cluster is not None
        request = protocol.encode(protocol.GenerateRequest(request_id, shard.model_id, list(prompt), params,
                                                           config))
        # The first chunk waits for the prompt's pass as well; later ones for one block each.
        stream = self.cluster.stream(scheduler, "Generate", request, self.pass_timeout_s * 2)
        async with aclosing(stream) as chunks:
            async for payload in chunks:
                chunk = self._chunk_decoder.decode(payload)
                if chunk.error:
                    if chunk.error_kind == "config":
                        raise ConfigError(chunk.error)
                    if chunk.error_kind in REFUSALS:
                        raise AdmissionRejected(chunk.error_kind, f"draft node {scheduler}: {chunk.error}",
                                                chunk.retry_after_s)
                    raise RingError(f"draft node {scheduler}: {chunk.error}")
                if chunk.finish_reason is not None:
                    self.remote_outcomes[request_id] = RequestOutcome(chunk.finish_reason, chunk.metrics)
                    while len(self.remote_outcomes) > 256:
                        self.remote_outcomes.popitem(last=False)
                yield Emitted(chunk.tokens, chunk.logprobs or [], chunk.finish_reason)

    async def _serve_generate(self, payload: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
        """The draft node's side of `_generate_on`: run the request here, send its blocks."""
        request = decode_message(self._generate_decoder, payload)
        try:
            async with self.generate(request.model_id, request.prompt, request.params, request.config,
                                     request.request_id, here=True) as blocks:
                async for block in blocks:
                    entries = block.logprobs if request.params.logprobs is not None else None
                    await send(protocol.encode(protocol.GenerateChunk(block.tokens, entries)))
        except ConfigError as exc:
            await send(protocol.encode(protocol.GenerateChunk(error=str(exc), error_kind="config")))
            return
        except AdmissionRejected as exc:  # the API node answers its client 429 with it
            await send(protocol.encode(protocol.GenerateChunk(error=str(exc), error_kind=exc.reason,
                                                              retry_after_s=exc.retry_after_s)))
            return
        except Exception as exc:  # reported to the API node, which answers its client with it
            log.warning("request %s from a peer failed: %s", request.request_id, exc)
            await send(protocol.encode(protocol.GenerateChunk(error=f"{type(exc).__name__}: {exc}",
                                                              error_kind="cluster")))
            return
        outcome = self.outcome(request.request_id)
        await send(protocol.encode(protocol.GenerateChunk(finish_reason=outcome.finish_reason if outcome else "stop",
                                                          metrics=outcome.metrics if outcome else None)))

    def outcome(self, request_id: str) -> RequestOutcome | None:
        """How a request ended (None while unknown), wherever it was scheduled."""
        request = self.engine.requests.get(request_id)
        if request is not None:
            return RequestOutcome(request.finish_reason, self.engine.request_metrics(request))
        return self.remote_outcomes.get(request_id)

    def _fire_tokens(self, request_id: str, tokens: list[int], finished: bool) -> None:
        buffered, _ = self.buffered_token_output.get(request_id, ([], False))
        buffered += tokens
        self.buffered_token_output[request_id] = (buffered, finished)
        for callback in list(self.on_token):
            try:
                callback(request_id, tokens, finished)
            except Exception:  # a broken subscriber must not break generation; it is logged
                log.exception("on_token callback failed")

    # -- upstream-style entry points -----------------------------------------------------------
    async def process_prompt(self, shard: Shard, prompt: str, request_id: str | None = None,
                             inference_state: dict | None = None) -> list[int]:
        """Encode and generate to completion with node defaults; tokens flow through on_token."""
        ids = self.engine.tokenizer.encode(prompt) if self.engine.tokenizer else None
        if ids is None:
            await self.shard_for(shard.model_id)
            ids = self.engine.tokenizer.encode(prompt)
        params = GenerationParams(max_tokens=self.max_generate_tokens, temperature=self.default_temperature)
        out: list[int] = []
        async with self.generate(shard.model_id, ids, params, request_id=request_id) as blocks:
            async for block in blocks:
                out += block.tokens
        return out

    async def process_tensor(self, shard: Shard, tensor: np.ndarray, request_id: str | None = None,
                             inference_state: dict | None = None) -> np.ndarray:
        """One forward pass of `tensor` through this node's shard (ring building block)."""
        await self.shard_for(shard.model_id)
        out, _ = await self.engine.target.infer_tensor(request_id or uuid.uuid4().hex, shard, tensor,
                                                       inference_state)
        return out

    async def broadcast_opaque_status(self, request_id: str, status: str) -> None:
        """Fire local status callbacks and send the status to every healthy peer (upstream:
        15 s per peer; a peer that does not take it is logged, the others still get it)."""
        json.loads(status)  # statuses are JSON strings with a "type" key, as upstream
        self._fire_status(request_id, status)
        if self.cluster is None:
            return
        payload = protocol.encode(protocol.OpaqueStatus(request_id, status))

        async def send(peer: str) -> None:
            try:
                await self.cluster.call(peer, "Status", payload, STATUS_TIMEOUT_S)
            except Exception as exc:  # one unreachable peer must not stop the broadcast
                log.warning("status for %s not delivered to %s: %s", request_id, peer, exc)

        async with anyio.create_task_group() as group:
            for peer in list(self.cluster.peers):
                group.start_soon(send, peer)

    async def _on_status(self, payload: bytes) -> bytes:
        message = decode_message(self._status_decoder, payload)
        self._fire_status(message.request_id, message.status)
        return protocol.encode(protocol.Ack())

    def _fire_status(self, request_id: str, status: str) -> None:
        for callback in list(self.on_opaque_status):
            try:
                callback(request_id, status)
            except Exception:  # a broken subscriber must not break the broadcast; it is logged
                log.exception("on_opaque_status callback failed")

    def cluster_metrics(self) -> dict | None:
        """Every ring stage's last report, recent requests' per-stage cache offsets and totals,
        and the requests whose KV this node's stage holds right now."""
        if self.cluster is None:
            return None
        return {**self.cluster.member.reports.snapshot(), "live_requests": self.live_requests(),
                "rejected_messages": self.cluster.server.rejected + self.cluster.member.rejected
                + self.cluster.inbox.rejected,
                "early_rollbacks": self.cluster.member.early_rollbacks,
                "dropped_blocks": self.cluster.member.dropped, "discarded_blocks": self.cluster.member.discarded,
                "late_results": self.cluster.inbox.late,
                "unauthenticated_calls": self.cluster.server.unauthenticated}

    def topology(self) -> dict:
        nodes = self.cluster.nodes() if self.cluster is not None else []
        return {"node_id": self.id, "nodes": [msgspec.to_builtins(n) for n in nodes],
                "model": self._shard.model_id if self._shard else None,
                "ring": [msgspec.to_builtins(s) for s in self._ring] if self._ring else None}

    def close(self) -> None:
        self.engine.close()

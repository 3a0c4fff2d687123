"""An Exo node: requests in, tokens out, events to subscribers.

Alone, a node runs the whole target itself. With peers (a `Cluster`), the target's layers
are split over the ring and each block is verified in one pass round it. The draft and the
scheduler run on one node, the draft node (by default the one holding layer 0, else
`draft_node`); a request that reaches the API of another node is streamed from there.

Upstream-compatible in spirit: `process_prompt` / `process_tensor`, per-request token
buffers, `on_token(request_id, tokens, is_finished)` callbacks (several tokens per call
when a speculative block verifies several), and `broadcast_opaque_status`. The API drives
`generate`, an async iterator that stops (and frees caches) when its consumer goes away.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict, deque
from contextlib import aclosing
from typing import AsyncIterator, Callable

import anyio
import msgspec
import numpy as np

from exo.inference.engine import InferenceEngine
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.networking import wire
from exo.orchestration.cluster import Cluster
from exo.orchestration.ring_stage import RingError, decode_message
from exo.orchestration.ring_verifier import RingVerifier
from exo.speculative.config import ConfigError, SpeculativeConfig
from exo.speculative.engine import SpeculativeInferenceEngine
from exo.speculative.events import EventBus
from exo.speculative.metrics import MetricsSnapshot
from exo.topology.partitioning import Stage

log = logging.getLogger("exo.node")


STATUS_TIMEOUT_S = 15.0


class RequestOutcome(msgspec.Struct, frozen=True):
    finish_reason: str | None
    metrics: MetricsSnapshot | None
TokenCallback = Callable[[str, list[int], bool], None]
StatusCallback = Callable[[str, str], None]


class Node:
    def __init__(self, node_id: str, engine_pair: Callable[[], tuple[InferenceEngine, InferenceEngine]],
                 config: SpeculativeConfig, default_model: str, *, max_generate_tokens: int = 1024,
                 default_temperature: float = 0.0, recent_window: int = 32,
                 cluster: Callable[[InferenceEngine, EventBus], Cluster] | None = None,
                 pass_timeout_s: float = 60.0, draft_node: str | None = None):
        self.id = node_id
        self.config = config
        self.default_model = default_model
        self.max_generate_tokens = max_generate_tokens
        self.default_temperature = default_temperature
        self.events = EventBus()
        self.engine = SpeculativeInferenceEngine(*engine_pair(), config, events=self.events, node_id=node_id)
        self.buffered_token_output: dict[str, tuple[list[int], bool]] = {}
        self.on_token: list[TokenCallback] = []
        self.on_opaque_status: list[StatusCallback] = []
        self.recent: deque[dict] = deque(maxlen=recent_window)
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
        self._generate_decoder = wire.decoder(wire.GenerateRequest)
        self._chunk_decoder = wire.decoder(wire.GenerateChunk)
        self._status_decoder = wire.decoder(wire.OpaqueStatus)

    # -- models --------------------------------------------------------------------------
    async def shard_for(self, model_id: str | None) -> Shard:
        """Load `model_id` here or over the ring (waiting for in-flight requests on another
        model or another ring to finish)."""
        model_id = model_id or self.default_model
        async with self._model_lock:
            shard = self._full_shards.get(model_id) or await self.engine.full_shard(model_id)
            self._full_shards[model_id] = shard
            ring = self.cluster.ring(shard.n_layers) if self.cluster is not None and self.cluster.peers else None
            if self._shard != shard or ring != self._ring:
                async with self._idle:
                    while self._active:
                        await self._idle.wait()
                self._shard = self._ring = None
                if ring is None:
                    await self.engine.target.ensure_shard(shard)
                else:
                    await self.cluster.prepare(model_id, shard.n_layers, ring)
                self._shard, self._ring = shard, ring
            return self._shard

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -- generation ----------------------------------------------------------------------
    async def generate(self, model_id: str | None, prompt: list[int], params: GenerationParams,
                       config: SpeculativeConfig | None = None, request_id: str | None = None,
                       here: bool = False) -> AsyncIterator[list[int]]:
        """Yield tokens block by block. `here`: schedule on this node whatever the ring says
        (a peer forwarded the request to us; sending it on could loop)."""
        request_id = request_id or uuid.uuid4().hex
        shard = await self.shard_for(model_id)
        config = config or self.config
        self._active += 1
        try:
            scheduler = self.id if here else self.scheduler_node()
            if scheduler == self.id:
                blocks = self._generate_here(shard, prompt, params, config, request_id)
            else:
                blocks = self._generate_on(scheduler, shard, prompt, params, config, request_id)
            async with aclosing(blocks) as stream:
                async for tokens, finished in stream:
                    self._fire_tokens(request_id, tokens, finished)
                    yield tokens
        finally:
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

    async def _generate_here(self, shard: Shard, prompt: list[int], params: GenerationParams,
                             config: SpeculativeConfig, request_id: str) -> AsyncIterator[tuple[list[int], bool]]:
        verifier = None
        if self._ring is not None and self.cluster is not None:
            cluster = self.cluster
            verifier = RingVerifier(self.id, cluster.call, cluster.member.spawn, cluster.inbox, self._ring,
                                    shard.model_id, shard.n_layers, request_id, params, self.pass_timeout_s,
                                    cluster.timeouts.send_s)
        stream = self.engine.generate(shard, prompt, params, config, request_id, verifier=verifier)
        async with aclosing(stream) as blocks:
            async for tokens in blocks:
                yield tokens, self.engine.requests[request_id].finish_reason is not None
        request = self.engine.requests[request_id]
        entry = {"request_id": request_id, "model": shard.model_id,
                 **msgspec.to_builtins(self.engine.request_metrics(request))}
        if verifier is not None:
            entry["ring"] = {"stages": [msgspec.to_builtins(s) for s in verifier.ring], **verifier.times.summary()}
        self.recent.append(entry)

    async def _generate_on(self, scheduler: str, shard: Shard, prompt: list[int], params: GenerationParams,
                           config: SpeculativeConfig, request_id: str) -> AsyncIterator[tuple[list[int], bool]]:
        assert self.cluster is not None
        request = wire.encode(wire.GenerateRequest(request_id, shard.model_id, list(prompt), params, config))
        # The first chunk waits for the prompt's pass as well; later ones for one block each.
        stream = self.cluster.stream(scheduler, "Generate", request, self.pass_timeout_s * 2)
        async with aclosing(stream) as chunks:
            async for payload in chunks:
                chunk = self._chunk_decoder.decode(payload)
                if chunk.error:
                    if chunk.error_kind == "config":
                        raise ConfigError(chunk.error)
                    raise RingError(f"draft node {scheduler}: {chunk.error}")
                if chunk.finish_reason is not None:
                    self.remote_outcomes[request_id] = RequestOutcome(chunk.finish_reason, chunk.metrics)
                    while len(self.remote_outcomes) > 256:
                        self.remote_outcomes.popitem(last=False)
                yield chunk.tokens, chunk.finish_reason is not None

    async def _serve_generate(self, payload: bytes) -> AsyncIterator[bytes]:
        """The draft node's side of `_generate_on`: run the request here, stream its blocks."""
        request = decode_message(self._generate_decoder, payload)
        try:
            async with aclosing(self.generate(request.model_id, request.prompt, request.params, request.config,
                                              request.request_id, here=True)) as blocks:
                async for tokens in blocks:
                    yield wire.encode(wire.GenerateChunk(tokens))
        except ConfigError as exc:
            yield wire.encode(wire.GenerateChunk(error=str(exc), error_kind="config"))
            return
        except Exception as exc:  # reported to the API node, which answers its client with it
            log.warning("request %s from a peer failed: %s", request.request_id, exc)
            yield wire.encode(wire.GenerateChunk(error=f"{type(exc).__name__}: {exc}", error_kind="cluster"))
            return
        outcome = self.outcome(request.request_id)
        yield wire.encode(wire.GenerateChunk(finish_reason=outcome.finish_reason if outcome else "stop",
                                             metrics=outcome.metrics if outcome else None))

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
        async with aclosing(self.generate(shard.model_id, ids, params, request_id=request_id)) as blocks:
            async for tokens in blocks:
                out += tokens
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
        payload = wire.encode(wire.OpaqueStatus(request_id, status))

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
        return wire.encode(wire.Ack())

    def _fire_status(self, request_id: str, status: str) -> None:
        for callback in list(self.on_opaque_status):
            try:
                callback(request_id, status)
            except Exception:  # a broken subscriber must not break the broadcast; it is logged
                log.exception("on_opaque_status callback failed")

    def cluster_metrics(self) -> dict | None:
        """Every ring stage's last report, recent requests' per-stage cache offsets, and the
        requests whose KV this node's stage holds right now."""
        if self.cluster is None:
            return None
        return {**self.cluster.member.reports.snapshot(), "live_requests": sorted(self.cluster.member.states),
                "rejected_messages": self.cluster.server.rejected + self.cluster.member.rejected
                + self.cluster.inbox.rejected,
                "early_rollbacks": self.cluster.member.early_rollbacks,
                "unauthenticated_calls": self.cluster.server.unauthenticated}

    def topology(self) -> dict:
        nodes = self.cluster.nodes() if self.cluster is not None else []
        return {"node_id": self.id, "nodes": [msgspec.to_builtins(n) for n in nodes],
                "model": self._shard.model_id if self._shard else None,
                "ring": [msgspec.to_builtins(s) for s in self._ring] if self._ring else None}

    def close(self) -> None:
        self.engine.close()

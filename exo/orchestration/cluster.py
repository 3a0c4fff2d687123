"""This node's view of the cluster: its peers, their health, the ring they form, the RPC server.

Peers come from discovery; a peer counts as part of the ring while it answers health
checks. Every node computes the ring from the same list (see `partition_by_memory`), and
each request carries the ring it runs on, so a topology change never splits one request
between two different partitions.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator

import anyio
import msgspec

from exo.inference.engine import InferenceEngine
from exo.networking.discovery import Discovery
from exo.networking.auth import is_loopback
from exo.networking.grpc_transport import LinkOptions, PeerError, PeerHandle, RPCServer, StreamHandler
from exo.networking.peer_info import PeerInfo
from exo.orchestration import protocol
from exo.orchestration.ring_stage import RingError, RingStage, RingTimeouts, decode_message
from exo.orchestration.ring_verifier import ResultInbox
from exo.speculative.events import EventBus
from exo.topology.partitioning import Stage, partition_by_memory

log = logging.getLogger("exo.cluster")


class Cluster:
    def __init__(self, info: PeerInfo, engine: InferenceEngine, events: EventBus, discovery: Discovery | None,
                 *, link: LinkOptions = LinkOptions(), health_interval_s: float = 1.0, health_timeout_s: float = 2.0,
                 timeouts: RingTimeouts = RingTimeouts()):
        self.info = info
        self.discovery = discovery
        self.link = link
        self.health_interval_s, self.health_timeout_s = health_interval_s, health_timeout_s
        self.timeouts = timeouts
        self.peers: dict[str, PeerHandle] = {}  # healthy peers only
        self.inbox = ResultInbox()
        self.member = RingStage(info.node_id, engine, self.call, events, timeouts)
        self.handlers = {
            "Health": self._on_health,
            "Prepare": self._on_prepare,
            "Forward": self.member.on_forward,
            "Result": self.inbox.on_result,
            "Event": self.member.on_event,
            "Release": self.member.on_release,
        }
        self.streams: dict[str, StreamHandler] = {}  # the node adds "Generate"
        self.server = RPCServer(info.host, info.port, self.handlers, self.streams, secret=link.secret,
                                node_id=info.node_id)
        self._prepared: tuple | None = None
        self._prepare_lock = anyio.Lock()
        self._handles: dict[str, PeerHandle] = {}  # every peer ever reached, healthy or not
        self._prepare_decoder = protocol.decoder(protocol.Prepare)

    @property
    def id(self) -> str:
        return self.info.node_id

    # -- lifetime -------------------------------------------------------------------------------
    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Serve RPCs, follow discovery and check peers' health until cancelled."""
        if not self.link.secret and not is_loopback(self.info.host):
            log.warning("node %s: RPC listens on %s without a cluster secret: anyone who can reach port %d can "
                        "join the ring and run requests (set --cluster-secret or EXO_CLUSTER_SECRET)",
                        self.id, self.info.host, self.info.port)
        await self.server.start()
        try:
            async with anyio.create_task_group() as group:
                self.member.group = group
                if self.discovery is not None:
                    await group.start(self.discovery.run)
                    group.start_soon(self._health_loop)
                log.info("node %s: RPC on %s:%d", self.id, self.info.host, self.server.port)
                task_status.started()
                await anyio.sleep_forever()  # background sends run in this group until cancelled
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                log.error("node %s: cluster tasks failed; this node leaves the ring", self.id, exc_info=exc)
            raise
        finally:
            self.member.group = None
            with anyio.CancelScope(shield=True):
                await self.server.stop()
                for handle in self._handles.values():
                    await handle.close()

    async def _health_loop(self) -> None:
        while True:
            known = self.discovery.peers() if self.discovery is not None else {}
            async with anyio.create_task_group() as checks:
                for peer_id, info in known.items():
                    if peer_id != self.id:
                        checks.start_soon(self._check, peer_id, info)
            for gone in set(self.peers) - set(known):
                self._drop(gone, "no longer discovered")
            await anyio.sleep(self.health_interval_s)

    async def _check(self, peer_id: str, info: PeerInfo) -> None:
        handle = await self._handle_at(peer_id, info)
        try:
            reply = protocol.decoder(protocol.Health).decode(
                await handle.call("Health", b"", self.health_timeout_s))
        except Exception as exc:  # any failure means "not healthy now"; the loop must go on
            self._drop(peer_id, f"{type(exc).__name__}: {exc}")
            return
        # Only what the peer knows better than discovery: the host it reports is where it
        # listens (often 0.0.0.0), not where it is reached, so the handle keeps its address.
        handle.info = msgspec.structs.replace(handle.info, memory=reply.info.memory)
        if peer_id not in self.peers:
            self._prepared = None  # a (re)joined node has to load its layers
            log.info("node %s: peer %s joined (%s, %.1f GB)", self.id, peer_id, handle.address, reply.info.memory / 1e9)
        self.peers[peer_id] = handle

    async def _handle_at(self, peer_id: str, info: PeerInfo) -> PeerHandle:
        """The one handle (one channel) to a peer, kept while discovery reports the same address;
        when the address really changes, a new one replaces it and the old channel is closed."""
        old = self._handles.get(peer_id)
        if old is not None and (old.info.host, old.info.port) == (info.host, info.port):
            return old
        handle = self._handles[peer_id] = PeerHandle(info, self.link)
        if old is not None:
            if self.peers.get(peer_id) is old:
                self.peers[peer_id] = handle  # swapped first, so no call picks the closing one
            log.info("node %s: peer %s moved from %s to %s", self.id, peer_id, old.address, handle.address)
            await old.close()
        return handle

    def _drop(self, peer_id: str, why: str) -> None:
        if self.peers.pop(peer_id, None) is not None:
            self._prepared = None
            log.warning("node %s: peer %s left the ring: %s", self.id, peer_id, why)

    async def _on_prepare(self, payload: bytes) -> bytes:
        prepare = decode_message(self._prepare_decoder, payload)
        for info in prepare.nodes:  # the origin's view: reach stages this node has not discovered yet
            if info.node_id != self.id and info.node_id not in self._handles:
                self._handles[info.node_id] = PeerHandle(info, self.link)
        await self.member.load_stage(prepare)
        return protocol.encode(protocol.Ack())

    async def _on_health(self, payload: bytes) -> bytes:
        return protocol.encode(protocol.Health(self.info))

    # -- the ring -------------------------------------------------------------------------------
    def nodes(self) -> list[PeerInfo]:
        return [self.info, *(handle.info for handle in self.peers.values())]

    def ring(self, n_layers: int) -> list[Stage]:
        return partition_by_memory(self.nodes(), n_layers)

    async def call(self, node_id: str, method: str, payload: bytes, timeout_s: float) -> bytes:
        """One RPC; to this node itself it is a direct call (no network, no delay). A peer that
        cannot be reached is a RingError: callers above see the ring's errors, not the transport's."""
        if node_id == self.id:
            with anyio.fail_after(timeout_s):
                return await self.handlers[method](payload)
        handle = self._handle(node_id)
        try:
            return await handle.call(method, payload, timeout_s)
        except PeerError as exc:
            raise RingError(str(exc)) from exc

    async def stream(self, node_id: str, method: str, payload: bytes, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """A peer's server stream; closing it early cancels the call. Failures as in `call`."""
        handle = self._handle(node_id)
        try:
            async with aclosing(handle.stream(method, payload, idle_timeout_s)) as messages:
                async for message in messages:
                    yield message
        except PeerError as exc:
            raise RingError(str(exc)) from exc

    def _handle(self, node_id: str) -> PeerHandle:
        handle = self.peers.get(node_id) or self._handles.get(node_id)
        if handle is None:
            raise RingError(f"node {self.id} does not know how to reach node {node_id}")
        return handle

    async def prepare(self, model_id: str, n_layers: int, ring: list[Stage]) -> None:
        """Every stage loads its layers (once per ring and model); a failure names the node."""
        key = (model_id, n_layers, tuple(ring))
        async with self._prepare_lock:
            if self._prepared == key:
                return
            payload = protocol.encode(protocol.Prepare(model_id, n_layers, ring, self.nodes()))
            failures: list[str] = []

            async def one(stage: Stage) -> None:
                try:
                    await self.call(stage.node_id, "Prepare", payload, self.timeouts.prepare_s)
                except Exception as exc:  # collected: the error names every stage that failed
                    failures.append(f"{stage.node_id}: {exc}")

            async with anyio.create_task_group() as group:
                for stage in ring:
                    group.start_soon(one, stage)
            if failures:
                raise RingError(f"could not load {model_id} on the ring: {'; '.join(failures)}")
            self._prepared = key
            log.info("node %s: ring ready for %s: %s", self.id, model_id,
                     ", ".join(f"{s.node_id}[{s.start_layer}-{s.end_layer}]" for s in ring))

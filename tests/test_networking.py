"""The transport and the ring protocol in one process: payloads, rejections, counters."""

import time
from contextlib import asynccontextmanager

import anyio
import grpc
import grpc.aio
import numpy as np
import pytest

from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.networking import auth
from exo.networking.discovery import Discovery
from exo.networking.grpc_transport import SERVICE, LinkOptions, PeerError, PeerHandle, RPCServer
from exo.networking.peer_info import PeerInfo
from exo.inference.shard import Shard
from exo.orchestration import protocol
from exo.orchestration.cluster import Cluster
from exo.orchestration.ring_stage import MAX_EARLY_ROLLBACKS, RingError, RingTimeouts, StageState
from exo.topology.partitioning import Stage
from exo.speculative.events import EventBus, EventCodec, KVRollback
from tools.local_ring import free_port


def test_probability_rows_go_sparse_only_when_it_is_smaller():
    rng = np.random.default_rng(0)
    dense = rng.random((3, 50)).astype(np.float32)
    sparse = np.zeros((3, 50), dtype=np.float32)
    sparse[[0, 1, 2], [4, 9, 49]] = [0.5, 1.0, 0.25]
    for rows, is_dense in ((dense, True), (sparse, False)):
        encoded = protocol.SparseRows.of(rows)
        assert (encoded.dense is not None) is is_dense
        decoded = msgspec_round_trip(encoded).array()
        assert decoded.dtype == rows.dtype and np.array_equal(decoded, rows)


def msgspec_round_trip(message):
    return protocol.decoder(type(message)).decode(protocol.encode(message))


@asynccontextmanager
async def serving_node(secret: str = ""):
    """A node's RPC server (no peers) and a handle to it, as a peer would hold it."""
    info = PeerInfo("solo", "127.0.0.1", free_port(), 1)
    cluster = Cluster(info, MLXInferenceEngine(), EventBus(), discovery=None, link=LinkOptions(secret=secret))
    try:
        async with anyio.create_task_group() as group:
            await group.start(cluster.run)
            handle = PeerHandle(info, LinkOptions(secret=secret))
            try:
                yield cluster, handle
            finally:
                await handle.close()
                group.cancel_scope.cancel()
    finally:
        cluster.member.engine.close()


async def test_health_reply_carries_the_node_info():
    async with serving_node() as (cluster, handle):
        reply = protocol.decoder(protocol.Health).decode(await handle.call("Health", b"", 5))
        assert reply.info == cluster.info


async def test_a_node_with_a_cluster_secret_refuses_every_call_without_it():
    async with serving_node(secret="correct horse") as (cluster, member_handle):
        reply = await member_handle.call("Health", b"", 5)
        assert protocol.decoder(protocol.Health).decode(reply).info == cluster.info
        for secret in ("", "wrong horse", "correct horse "):
            stranger = PeerHandle(cluster.info, LinkOptions(secret=secret))
            try:
                for method in ("Health", "Forward", "Event", "Release"):
                    with pytest.raises(PeerError, match="UNAUTHENTICATED"):
                        await stranger.call(method, protocol.encode(protocol.Ack()), 5)
            finally:
                await stranger.close()
        assert cluster.server.unauthenticated == 12
        assert cluster.server.rejected == 0  # refused before any payload was read


async def test_corrupt_and_misrouted_messages_are_rejected_and_counted():
    async with serving_node() as (cluster, handle):
        for method, payload in (("Forward", b"\x93garbage"), ("Result", b"\x00"), ("Event", b"not msgpack"),
                                ("Release", protocol.encode(protocol.Ack()))):
            with pytest.raises(PeerError, match="INVALID_ARGUMENT"):
                await handle.call(method, payload, 5)
        assert cluster.server.rejected == 4
        header = protocol.BlockHeader("r", "solo", "m", 4, [], 0, 0, [1], 0, GenerationParams())
        with pytest.raises(PeerError, match="sent to node solo"):
            await handle.call("Forward", protocol.encode(protocol.Forward(header, 0)), 5)
        # A verdict nobody waits for (late, duplicated or out of order) is refused and counted.
        with pytest.raises(PeerError, match="no pass waits"):
            await handle.call("Result", protocol.encode(protocol.Result("r", 3, "other")), 5)
        assert cluster.inbox.rejected == 2


async def test_rollbacks_apply_in_epoch_order_and_stale_ones_fail_the_request(tiny_llama):
    """Epoch 2's rollback may overtake epoch 1's on the network: it is held, untrimmed, until
    epoch 1's arrives, then both apply in order. A rollback for an epoch already ended
    (duplicate or stale) fails the request instead of trimming."""
    async with serving_node() as (cluster, handle):
        member = cluster.member
        shard = Shard(str(tiny_llama), 0, 3, 4)
        await member.engine.infer_tensor("req", shard, np.asarray([[1, 2, 3, 4, 5, 6, 7]]))
        member.states["req"] = StageState(shard, "solo")
        codec = EventCodec()
        early = KVRollback(request_id="req", keep_tokens=3, block=4, epoch=2)  # epoch 1's is still on its way
        await handle.call("Event", codec.encode(early), 5)
        state = member.states["req"]
        assert state.epoch == 0 and not state.failed and member.rejected == 0 and member.early_rollbacks == 1
        assert member.engine.cache_offset("req") == 7  # nothing trimmed before epoch 1's rollback
        await handle.call("Event", codec.encode(KVRollback(request_id="req", keep_tokens=5, block=2, epoch=1)), 5)
        assert state.epoch == 2 and not state.failed and state.early == {}
        assert member.engine.cache_offset("req") == 3  # 7 -> 5 (epoch 1) -> 3 (epoch 2)
        assert member.reports.offsets("req") == {"solo": {2: 5, 4: 3}}
        stale = KVRollback(request_id="req", keep_tokens=2, block=5, epoch=2)
        await handle.call("Event", codec.encode(stale), 5)
        assert member.rejected == 1 and "out of order" in state.failed
        assert member.engine.cache_offset("req") == 3  # nothing was trimmed on a bad announcement
        unknown = KVRollback(request_id="nobody", keep_tokens=2, block=1, epoch=1)
        await handle.call("Event", codec.encode(unknown), 5)
        assert member.rejected == 2


async def test_a_rollback_that_never_comes_fails_the_block_waiting_for_it(tiny_llama):
    async with serving_node() as (cluster, handle):
        member = cluster.member
        member.timeouts = RingTimeouts(rollback_wait_s=0.3)
        shard = Shard(str(tiny_llama), 0, 3, 4)
        await member.engine.infer_tensor("req", shard, np.asarray([[1, 2, 3, 4, 5]]))
        member.states["req"] = StageState(shard, "solo")
        codec = EventCodec()
        await handle.call("Event", codec.encode(KVRollback(request_id="req", keep_tokens=3, block=5, epoch=2)), 5)

        def block(seq: int, start: int, epoch: int) -> protocol.Forward:
            return protocol.Forward(protocol.BlockHeader(
                "req", "solo", str(tiny_llama), 4, [Stage("solo", 0, 3)], seq, start, [1], start,
                GenerationParams(), epoch=epoch), 0)

        with anyio.fail_after(5), pytest.raises(RingError, match="no KVRollback for epoch 1"):
            await member._turn(block(3, 3, epoch=1))
        # A block of the current epoch whose base is not what the cache holds: the blocks before
        # it never came (a shorter cache), or it is a duplicate (a longer one).
        with anyio.fail_after(5), pytest.raises(RingError, match="did not come within"):
            await member._turn(block(3, 6, epoch=0))
        with pytest.raises(RingError, match="holds 5 tokens, block 3 expects 4"):
            await member._turn(block(3, 4, epoch=0))
        assert await member._turn(block(3, 5, epoch=0)) is member.states["req"]
        assert member.engine.cache_offset("req") == 5
        # More early rollbacks than a stage holds: the request fails instead of buffering without end.
        for epoch in range(3, 3 + MAX_EARLY_ROLLBACKS):
            await handle.call("Event", codec.encode(KVRollback(request_id="req", keep_tokens=3, block=epoch,
                                                               epoch=epoch)), 5)
        assert member.rejected == 1 and "still missing" in member.states["req"].failed


async def test_unreachable_peer_is_a_clear_error_within_the_timeout():
    handle = PeerHandle(PeerInfo("ghost", "127.0.0.1", free_port()))
    with anyio.fail_after(10):
        with pytest.raises(PeerError, match="ghost"):
            await handle.call("Health", b"", 2)
    await handle.close()


async def test_opaque_status_reaches_every_peer(tmp_path, tiny_llama):
    import json

    from exo.networking.discovery import ManualDiscovery
    from exo.orchestration.node import Node
    from exo.speculative.config import SpeculativeConfig

    infos = [PeerInfo(f"n{i}", "127.0.0.1", free_port(), 1) for i in range(2)]
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": {p.node_id: {"address": p.host, "port": p.port} for p in infos}}))
    nodes = [Node(info.node_id, lambda: (MLXInferenceEngine(), MLXInferenceEngine()), SpeculativeConfig(),
                  str(tiny_llama),
                  cluster=lambda engine, events, info=info: Cluster(info, engine, events,
                                                                     ManualDiscovery(peers, info.node_id),
                                                                     health_interval_s=0.1))
             for info in infos]
    received: list[tuple[str, str, str]] = []
    for node in nodes:
        node.on_opaque_status.append(lambda rid, status, node=node: received.append((node.id, rid, status)))
    try:
        async with anyio.create_task_group() as group:
            for node in nodes:
                await group.start(node.cluster.run)
            with anyio.fail_after(10):
                while not all(node.cluster.peers for node in nodes):
                    await anyio.sleep(0.05)
            status = json.dumps({"type": "node_status", "status": "ready"})
            await nodes[0].broadcast_opaque_status("r1", status)
            assert sorted(received) == [("n0", "r1", status), ("n1", "r1", status)]
            group.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.close()


async def test_requests_abandoned_by_their_origin_are_freed(tiny_llama):
    async with serving_node() as (cluster, _):
        member = cluster.member
        shard = Shard(str(tiny_llama), 0, 3, 4)
        for rid in ("old", "fresh"):
            await member.engine.infer_tensor(rid, shard, np.asarray([[1, 2, 3]]))
            member.states[rid] = StageState(shard, "elsewhere")
        member.states["old"].touched -= member.timeouts.abandoned_s + 1
        member._release_abandoned()
        assert sorted(member.states) == ["fresh"]
        assert member.engine.cache_offset("old") == 0 and member.engine.cache_offset("fresh") == 3


async def test_a_node_listening_beyond_loopback_without_a_secret_warns(caplog):
    for host, secret, warns in (("0.0.0.0", "", True), ("0.0.0.0", "s", False), ("127.0.0.1", "", False)):
        caplog.clear()
        info = PeerInfo("open", host, free_port(), 1)
        cluster = Cluster(info, MLXInferenceEngine(), EventBus(), discovery=None, link=LinkOptions(secret=secret))
        try:
            async with anyio.create_task_group() as group:
                await group.start(cluster.run)
                group.cancel_scope.cancel()
        finally:
            cluster.member.engine.close()
        assert ("without a cluster secret" in caplog.text) is warns, (host, secret, caplog.text)


def test_link_options_refuse_negative_delays():
    for delay, jitter in ((-0.001, 0.0), (0.0, -0.005)):
        with pytest.raises(ValueError, match="must be >= 0"):
            LinkOptions(delay, jitter)


# ---------------------------------------------------------------- the cluster secret on the wire

SECRET = "correct horse"


async def call_with(port: int, method: str, payload: bytes, metadata) -> bytes:
    """A call carrying exactly `metadata`: what a listener who recorded a call can send."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await channel.unary_unary(f"/{SERVICE}/{method}")(payload, metadata=metadata, timeout=5)


async def refused(call) -> bool:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        return True
    return False


async def test_a_recorded_call_cannot_be_replayed_nor_its_header_reused():
    async with serving_node(secret=SECRET) as (cluster, _):
        port, me = cluster.server.port, cluster.id
        recorded = auth.call_metadata(SECRET, f"{me}/Health", b"")
        assert not await refused(call_with(port, "Health", b"", recorded))  # the call as the member sent it
        assert await refused(call_with(port, "Health", b"", recorded))  # replayed
        other = protocol.encode(protocol.Ack())
        assert await refused(call_with(port, "Event", other, auth.call_metadata(SECRET, f"{me}/Event", b"")))  # payload
        assert await refused(call_with(port, "Release", other, auth.call_metadata(SECRET, f"{me}/Event", other)))
        assert await refused(call_with(port, "Health", b"", auth.call_metadata(SECRET, "another-node/Health", b"")))
        for skew in (-120, 120):
            stale = auth.call_metadata(SECRET, f"{me}/Health", b"", now=time.time() + skew)
            assert await refused(call_with(port, "Health", b"", stale))
        assert await refused(call_with(port, "Health", b"", ((auth.HEADER, "1.2"),)))
        assert cluster.server.unauthenticated == 7 and cluster.server.rejected == 0
        assert not await refused(call_with(port, "Health", b"", auth.call_metadata(SECRET, f"{me}/Health", b"")))


async def test_the_secret_never_leaves_in_a_call():
    async with serving_node(secret=SECRET) as (cluster, handle):
        seen: list[tuple] = []
        check = cluster.server.guard.refusal

        def recording(method, payload, metadata):
            seen.append(tuple(metadata))
            return check(method, payload, metadata)

        cluster.server.guard.refusal = recording
        await handle.call("Health", b"", 5)
        await handle.call("Health", b"", 5)  # a second call: a new header, not a replay
        wire = b"".join(str(key).encode() + (value if isinstance(value, bytes) else value.encode())
                        for metadata in seen for key, value in metadata)
        assert len(seen) == 2 and auth.HEADER.encode() in wire
        assert SECRET.encode() not in wire and b"horse" not in wire
        assert cluster.server.unauthenticated == 0


def test_the_nonce_cache_is_bounded_and_refuses_what_it_forgot():
    now = [1000.0]
    guard = auth.CallGuard(SECRET, max_nonces=2, clock=lambda: now[0])
    calls = [auth.call_metadata(SECRET, "Health", b"", now=now[0] - age) for age in (3, 2, 1)]
    assert [guard.refusal("Health", b"", call) for call in calls] == [None, None, None]
    assert len(guard._nonces) == 2
    assert "replayed" in guard.refusal("Health", b"", calls[0])  # evicted, yet refused: too old now
    assert "replayed" in guard.refusal("Health", b"", calls[2])
    assert guard.refusal("Health", b"", auth.call_metadata(SECRET, "Health", b"", now=now[0])) is None
    assert auth.CallGuard("").refusal("Health", b"", ()) is None  # no secret, no checks


async def test_a_stream_is_refused_without_the_secret_and_its_header_cannot_be_replayed():
    served: list[bytes] = []

    async def generate(request: bytes, send) -> None:
        served.append(request)
        for token in (b"one", b"two"):
            await send(token)

    server = RPCServer("127.0.0.1", free_port(), {}, {"Generate": generate}, secret=SECRET, node_id="streamer")
    await server.start()
    info = PeerInfo("streamer", "127.0.0.1", server.port)
    try:
        for secret in ("", "wrong horse"):
            stranger = PeerHandle(info, LinkOptions(secret=secret))
            try:
                with pytest.raises(PeerError, match="UNAUTHENTICATED"):
                    async for _ in stranger.stream("Generate", b"prompt", 5):
                        pass
            finally:
                await stranger.close()
        member = PeerHandle(info, LinkOptions(secret=SECRET))
        try:
            assert [m async for m in member.stream("Generate", b"prompt", 5)] == [b"one", b"two"]
        finally:
            await member.close()
        recorded = auth.call_metadata(SECRET, "streamer/Generate", b"prompt")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            generate_call = channel.unary_stream(f"/{SERVICE}/Generate")
            assert [m async for m in generate_call(b"prompt", metadata=recorded, timeout=5)] == [b"one", b"two"]
            with pytest.raises(grpc.aio.AioRpcError) as replay:
                async for _ in generate_call(b"prompt", metadata=recorded, timeout=5):
                    pass
        assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.unauthenticated == 3 and served == [b"prompt", b"prompt"]
    finally:
        await server.stop()


# ---------------------------------------------------------------- one handle per peer


class StaticDiscovery(Discovery):
    """Reports whatever the test puts in `view`, as UDP discovery would report a peer that listens on
    0.0.0.0: at the address its datagrams came from."""

    def __init__(self, view: dict[str, PeerInfo]) -> None:
        self.view = view

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    def peers(self) -> dict[str, PeerInfo]:
        return dict(self.view)


async def test_health_checks_keep_one_handle_per_peer_and_close_it_when_the_peer_moves(monkeypatch):
    import exo.orchestration.cluster as cluster_module

    made: list[PeerHandle] = []
    closed: list[PeerHandle] = []

    class CountedHandle(PeerHandle):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        async def close(self) -> None:
            closed.append(self)
            await super().close()

    monkeypatch.setattr(cluster_module, "PeerHandle", CountedHandle)
    far = PeerInfo("far", "0.0.0.0", free_port(), 3 << 30)  # what it says about itself in Health replies
    seen = StaticDiscovery({"far": PeerInfo("far", "127.0.0.1", far.port, 1)})
    near = Cluster(PeerInfo("near", "127.0.0.1", free_port(), 1), MLXInferenceEngine(), EventBus(), seen,
                   health_interval_s=0.05)
    other = Cluster(far, MLXInferenceEngine(), EventBus(), discovery=None)
    try:
        async with anyio.create_task_group() as group:
            await group.start(other.run)
            await group.start(near.run)
            with anyio.fail_after(10):
                while "far" not in near.peers:
                    await anyio.sleep(0.01)
            handle = near.peers["far"]
            await anyio.sleep(6 * 0.05)  # several health checks, each answered with host 0.0.0.0
            assert near.peers["far"] is handle and near._handles["far"] is handle and made == [handle]
            assert handle.info == PeerInfo("far", "127.0.0.1", far.port, far.memory)  # address kept, memory taken
            assert closed == []

            seen.view["far"] = PeerInfo("far", "127.0.0.2", far.port, 1)  # it really moved (0.0.0.0 still hears)
            with anyio.fail_after(10):
                while near.peers.get("far") in (None, handle):
                    await anyio.sleep(0.01)
            await anyio.sleep(3 * 0.05)
            assert closed == [handle] and made == [handle, near.peers["far"]]
            assert near.peers["far"].address == f"127.0.0.2:{far.port}"
            group.cancel_scope.cancel()
    finally:
        near.member.engine.close()
        other.member.engine.close()

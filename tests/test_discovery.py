"""Discovery tests. UDP tests only ever send to 127.255.255.255 (loopback broadcast) and bind to
it, so nothing leaves the machine; see exo/networking/discovery/udp.py for why that works."""

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
import pytest

from exo.networking.discovery import DiscoveryConfigError, ManualDiscovery, UDPDiscovery
from exo.networking.discovery.udp import ANNOUNCE_TYPE, encode_announcement
from exo.networking.peer_info import PeerInfo

LOOPBACK_BROADCAST = "127.255.255.255"


async def wait_until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    with anyio.move_on_after(within_s):
        while not predicate():
            await anyio.sleep(0.02)
    assert predicate(), f"not within {within_s}s: {what}"


def write_json(path: Path, peers: dict) -> None:
    path.write_text(json.dumps({"peers": peers}))


def bump_mtime(path: Path, seconds: int) -> None:
    """Make the change visible even if the write landed in the same mtime tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


# ---------------------------------------------------------------- manual


def test_manual_json_skips_self(tmp_path):
    path = tmp_path / "peers.json"
    write_json(
        path,
        {
            "me": {"address": "10.0.0.1", "port": 5000, "memory": 1},
            "a": {"address": "10.0.0.2", "port": 5001, "memory": 16 << 30},
            "b": {"address": "10.0.0.3", "port": 5002},
        },
    )
    d = ManualDiscovery(path, self_id="me")
    assert d.peers() == {
        "a": PeerInfo("a", "10.0.0.2", 5001, 16 << 30),
        "b": PeerInfo("b", "10.0.0.3", 5002, 0),
    }


def test_manual_toml(tmp_path):
    path = tmp_path / "peers.toml"
    path.write_text(
        '[peers.me]\naddress = "127.0.0.1"\nport = 6000\n\n'
        '[peers."node-2"]\naddress = "127.0.0.1"\nport = 6001\nmemory = 8589934592\n'
    )
    d = ManualDiscovery(str(path), self_id="me")
    assert d.peers() == {"node-2": PeerInfo("node-2", "127.0.0.1", 6001, 8 << 30)}


def test_manual_reads_upstream_device_capabilities_memory(tmp_path):
    path = tmp_path / "peers.json"
    write_json(
        path,
        {
            "up": {
                "address": "127.0.0.1",
                "port": 50051,
                "device_capabilities": {"model": "Mac", "chip": "M2", "memory": 16384, "flops": {}},
            }
        },
    )
    assert ManualDiscovery(path, self_id="me").peers()["up"].memory == 16384 * 1024 * 1024


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.json", None, "does not exist"),
        ("broken.json", '{"peers": {', "not valid JSON"),
        ("broken.toml", "[peers.a\naddress=", "not valid TOML"),
        ("types.json", '{"peers": {"a": {"address": "x", "port": "5000"}}}', "peer 'a': Expected `int`"),
        ("range.json", '{"peers": {"a": {"address": "x", "port": 70000}}}', "peer 'a': Expected `int` <= 65535"),
        ("nopeers.json", '{"nodes": {}}', "missing required field `peers`"),
        ("noaddr.toml", "[peers.a]\nport = 1\n", "missing required field `address`"),
        ("peers.yaml", "peers: {}", "unsupported extension"),
    ],
)
def test_manual_bad_file_is_a_config_error(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DiscoveryConfigError) as info:
        ManualDiscovery(path, self_id="me")
    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)


async def test_manual_picks_up_edits_and_survives_bad_ones(tmp_path, caplog):
    path = tmp_path / "peers.json"
    write_json(path, {"a": {"address": "127.0.0.1", "port": 1}})
    d = ManualDiscovery(path, self_id="me", poll_s=0.02)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)

        write_json(path, {"a": {"address": "127.0.0.1", "port": 1}, "b": {"address": "127.0.0.1", "port": 2}})
        bump_mtime(path, 1)
        await wait_until(lambda: set(d.peers()) == {"a", "b"}, 5, "new peer b picked up")

        with caplog.at_level(logging.WARNING, logger="exo.discovery.manual"):
            path.write_text("{not json")
            bump_mtime(path, 2)
            await wait_until(lambda: "not valid JSON" in caplog.text, 5, "warning about the bad edit")
        assert set(d.peers()) == {"a", "b"}  # previous view kept

        write_json(path, {"me": {"address": "127.0.0.1", "port": 9}, "c": {"address": "127.0.0.1", "port": 3}})
        bump_mtime(path, 3)
        await wait_until(lambda: set(d.peers()) == {"c"}, 5, "recovery after the bad edit")
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- UDP


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_udp(node_id: str, port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> UDPDiscovery:
    return UDPDiscovery(
        PeerInfo(node_id, host, 7000 + len(node_id), memory=len(node_id)),
        listen_port=port,
        broadcast_address=LOOPBACK_BROADCAST,
        bind_address=LOOPBACK_BROADCAST,
        interval_s=0.1,
        timeout_s=timeout_s,
    )


def send_raw(port: int, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.sendto(data, (LOOPBACK_BROADCAST, port))


async def test_udp_nodes_find_each_other_and_drop_stopped_ones():
    port = free_udp_port()
    a = loopback_udp("a", port)
    b = loopback_udp("bb", port)
    c = loopback_udp("ccc", port, host="0.0.0.0")  # unspecified host: receivers use the source address
    nodes = [a, b, c]
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        async with anyio.create_task_group() as c_group:
            await c_group.start(c.run)
            await wait_until(
                lambda: all(set(n.peers()) == {"a", "bb", "ccc"} - {n.self_info.node_id} for n in nodes),
                5,
                "all three see the other two",
            )
            assert a.peers()["bb"] == b.self_info
            assert a.peers()["ccc"] == PeerInfo("ccc", "127.0.0.1", c.self_info.port, c.self_info.memory)
            assert b.peers()["a"] == a.self_info
            c_group.cancel_scope.cancel()

        # c stopped announcing: gone after timeout_s (1 s), a and b still see each other.
        await wait_until(lambda: "ccc" not in a.peers() and "ccc" not in b.peers(), 5, "stopped node dropped")
        await anyio.sleep(0.3)
        assert set(a.peers()) == {"bb"} and set(b.peers()) == {"a"}
        tg.cancel_scope.cancel()

    # Cancellation closed every socket: the port can now be bound without any reuse option.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK_BROADCAST, port))


async def test_udp_malformed_datagrams_are_counted_and_dropped():
    port = free_udp_port()
    a = loopback_udp("a", port)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        peer = {"node_id": "x", "host": "127.0.0.1", "port": 1}
        bad = [
            b"not msgpack at all \xff\xfe",
            b"",
            msgspec.msgpack.encode({"type": "someone-else", "version": 1, "peer": peer}),
            msgspec.msgpack.encode({"version": 1, "peer": peer}),  # no magic
            msgspec.msgpack.encode({"type": ANNOUNCE_TYPE, "version": 99, "peer": peer}),
            msgspec.msgpack.encode({"type": ANNOUNCE_TYPE, "version": 1, "peer": {**peer, "port": "1"}}),
        ]
        for data in bad:
            send_raw(port, data)
        await wait_until(lambda: a.malformed == len(bad), 5, f"{len(bad)} malformed datagrams counted")
        assert a.peers() == {}

        # Still alive and listening: a valid announcement afterwards is accepted.
        send_raw(port, encode_announcement(PeerInfo("x", "127.0.0.1", 1)))
        await wait_until(lambda: "x" in a.peers(), 5, "valid announcement after garbage")
        assert a.malformed == len(bad)
        tg.cancel_scope.cancel()


async def test_udp_ignores_own_announcements():
    port = free_udp_port()
    a = loopback_udp("a", port)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        # Our own datagram, sent from elsewhere, is also recognised by node_id.
        send_raw(port, encode_announcement(a.self_info))
        await anyio.sleep(0.5)  # several of its own broadcasts have looped back by now
        assert a.peers() == {}
        assert a.malformed == 0
        tg.cancel_scope.cancel()


def test_udp_rejects_bad_arguments():
    info = PeerInfo("a", "127.0.0.1", 1)
    with pytest.raises(ValueError, match="listen_port"):
        UDPDiscovery(info, listen_port=0)
    with pytest.raises(ValueError, match="positive"):
        UDPDiscovery(info, listen_port=5000, interval_s=0)


async def test_udp_with_a_cluster_secret_drops_unsigned_and_wrongly_signed_announcements():
    port = free_udp_port()
    a = UDPDiscovery(PeerInfo("a", "127.0.0.1", 7001), listen_port=port, broadcast_address=LOOPBACK_BROADCAST,
                     bind_address=LOOPBACK_BROADCAST, interval_s=0.1, secret="s3cret")
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        send_raw(port, encode_announcement(PeerInfo("stranger", "127.0.0.1", 1)))
        send_raw(port, encode_announcement(PeerInfo("guesser", "127.0.0.1", 2), secret="wrong"))
        forged = msgspec.msgpack.decode(encode_announcement(PeerInfo("forger", "127.0.0.1", 3), secret="s3cret"))
        forged["peer"]["port"] = 4  # a member's signed announcement, altered in flight
        send_raw(port, msgspec.msgpack.encode(forged))
        await wait_until(lambda: a.malformed == 3, 5, "three unauthenticated announcements counted")
        send_raw(port, encode_announcement(PeerInfo("member", "127.0.0.1", 5), secret="s3cret"))
        await wait_until(lambda: "member" in a.peers(), 5, "a signed announcement is accepted")
        assert set(a.peers()) == {"member"} and a.malformed == 3
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- UDP: replays, with a secret

SECRET = "s3cret"


def secret_udp(node_id: str, port: int, host: str) -> UDPDiscovery:
    return UDPDiscovery(PeerInfo(node_id, host, 7100 + len(node_id), memory=len(node_id)), listen_port=port,
                        broadcast_address=LOOPBACK_BROADCAST, bind_address=LOOPBACK_BROADCAST, interval_s=0.05,
                        secret=SECRET)


async def captured_announcements(node: UDPDiscovery, n: int) -> list[bytes]:
    """The first `n` datagrams `node` really broadcasts, as a listener on the LAN records them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((LOOPBACK_BROADCAST, node.listen_port))
        listener.setblocking(False)
        captured: list[bytes] = []
        async with anyio.create_task_group() as tg:
            await tg.start(node.run)
            with anyio.fail_after(5):
                while len(captured) < n:
                    try:
                        captured.append(listener.recv(65535))
                    except BlockingIOError:
                        await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    return captured


async def test_udp_a_replayed_announcement_neither_moves_the_peer_nor_refreshes_it(caplog):
    """A member listening on 0.0.0.0 (the default): a listener captures its signed announcement and
    sends it again, from its own address (which used to move the peer there, so that the next
    health check went to the listener) and from the member's."""
    port = free_udp_port()
    first, second = await captured_announcements(secret_udp("member", port, host="0.0.0.0"), 2)
    receiver = secret_udp("receiver", port, host="127.0.0.1")
    receiver._handle(first, ("127.0.0.1", 40000))
    assert receiver.peers()["member"].host == "127.0.0.1"  # the member claimed the address it sent from
    with caplog.at_level(logging.DEBUG, logger="exo.discovery.udp"):
        receiver._handle(first, ("127.0.0.9", 40000))  # (a) replayed from elsewhere
        assert receiver.peers()["member"].host == "127.0.0.1" and receiver.malformed == 1
        assert "claims host '127.0.0.1' but comes from 127.0.0.9" in caplog.text
        receiver._handle(first, ("127.0.0.1", 40000))  # (b) replayed from the right address
        assert receiver.malformed == 2 and "replayed" in caplog.text
    receiver._handle(second, ("127.0.0.1", 40000))  # the member's next one is newer
    assert receiver.malformed == 2
    receiver._handle(first, ("127.0.0.1", 40000))
    assert receiver.malformed == 3


async def test_udp_a_stale_announcement_is_refused_and_a_restarted_node_is_accepted(caplog):
    port = free_udp_port()
    (before_restart,) = await captured_announcements(secret_udp("member", port, host="127.0.0.1"), 1)
    receiver = secret_udp("receiver", port, host="127.0.0.1")
    receiver._handle(before_restart, ("127.0.0.1", 40000))
    assert "member" in receiver.peers()
    info = PeerInfo("other", "127.0.0.1", 1)
    with caplog.at_level(logging.DEBUG, logger="exo.discovery.udp"):
        for skew in (-120, 120, float("nan")):  # a captured announcement replayed later, or a forged clock
            receiver._handle(encode_announcement(info, SECRET, sent_at=time.time() + skew), ("127.0.0.1", 40000))
        assert receiver.malformed == 3 and "other" not in receiver.peers() and "not fresh" in caplog.text
    # A new life of the same node: a new boot id, its seq starting over, accepted while fresh.
    (after_restart,) = await captured_announcements(secret_udp("member", port, host="127.0.0.1"), 1)
    receiver._handle(after_restart, ("127.0.0.1", 40000))
    assert receiver.malformed == 3 and "member" in receiver.peers()
    receiver._handle(before_restart, ("127.0.0.1", 40000))  # the earlier life, replayed
    assert receiver.malformed == 4


async def test_udp_nodes_with_a_secret_and_unspecified_hosts_find_each_other():
    """Listening on 0.0.0.0, each claims the address its datagrams leave from, which checks."""
    port = free_udp_port()
    nodes = [secret_udp("a", port, host="0.0.0.0"), secret_udp("bb", port, host="0.0.0.0")]
    async with anyio.create_task_group() as tg:
        for node in nodes:
            await tg.start(node.run)
        await wait_until(lambda: all(len(n.peers()) == 1 for n in nodes), 5, "both see each other")
        assert nodes[0].peers()["bb"] == PeerInfo("bb", "127.0.0.1", nodes[1].self_info.port, 2)
        await anyio.sleep(0.3)  # several more announcements, each newer than the last
        assert [n.malformed for n in nodes] == [0, 0]
        tg.cancel_scope.cancel()


def test_udp_without_a_secret_still_trusts_the_source_for_an_unspecified_host():
    receiver = loopback_udp("receiver", free_udp_port())
    receiver._handle(encode_announcement(PeerInfo("old", "0.0.0.0", 1)), ("127.0.0.7", 40000))
    assert receiver.peers()["old"].host == "127.0.0.7" and receiver.malformed == 0

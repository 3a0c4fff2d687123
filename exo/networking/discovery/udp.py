"""Discovery by UDP broadcast: every node announces itself and listens for the others.

Each node sends a small msgpack datagram (`Announcement`: a `type` tag as magic, a protocol
version, and its PeerInfo) to (broadcast_address, listen_port) every `interval_s`, and listens on
(bind_address, listen_port). The listening socket sets SO_REUSEADDR (and SO_REUSEPORT where the
platform has it), so several nodes on one host can share the port; a broadcast datagram is
delivered to every socket bound to it, while a unicast one would reach only one of them. A peer
not heard from for `timeout_s` is dropped. Anything that is not a valid announcement is counted
in `malformed` and dropped: the port is open to the whole LAN and must not be able to crash the
node.

Loopback (what the tests use, checked on Linux 6.x): broadcasting to 127.255.255.255 with
SO_BROADCAST reaches every socket bound to the port with SO_REUSEADDR, when they are bound to
0.0.0.0 or to 127.255.255.255 itself; sockets bound to 127.0.0.1 do not receive it. Unicast to
127.0.0.1 reaches only one of the sharing sockets, so it is no substitute. The tests therefore
use broadcast_address = bind_address = "127.255.255.255", which keeps everything on `lo`. This
relies on Linux treating 127.0.0.0/8 as a broadcast-capable subnet; macOS's lo0 does not do
broadcast, so there a single-host cluster should use ManualDiscovery.

With a cluster secret, each announcement carries an HMAC-SHA256 of its fields under the secret
(`mac`); a node with a secret drops (and counts) announcements whose MAC does not check, so a
stranger on the LAN cannot inject peers. A captured announcement can be replayed, but it only
repeats what a member said.

If a node announces an unspecified host ("0.0.0.0", "::" or ""), receivers substitute the
datagram's source address, so a node listening on all interfaces is still reachable.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Final, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from exo.networking import auth
from exo.networking.discovery.base import Discovery
from exo.networking.peer_info import PeerInfo

log = logging.getLogger("exo.discovery.udp")

ANNOUNCE_TYPE: Final = "exo-spec/announce"
PROTOCOL_VERSION = 1
_MAX_DATAGRAM = 65535
_UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::")


class Announcement(msgspec.Struct, frozen=True):
    """One node saying "I am here". `type` is required and must match exactly: it is the magic
    that makes datagrams from other programs on the port fail to decode instead of being misread."""

    type: Literal["exo-spec/announce"]
    version: int
    peer: PeerInfo
    mac: bytes = b""  # HMAC of the other fields under the cluster secret (empty without one)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Announcement)


def _signed_part(msg: Announcement) -> bytes:
    return _encoder.encode(msgspec.structs.replace(msg, mac=b""))


def encode_announcement(peer: PeerInfo, secret: str = "") -> bytes:
    """The datagram a node broadcasts about itself."""
    msg = Announcement(type=ANNOUNCE_TYPE, version=PROTOCOL_VERSION, peer=peer)
    return _encoder.encode(msgspec.structs.replace(msg, mac=auth.sign(secret, _signed_part(msg))))


if hasattr(anyio, "wait_readable"):  # anyio >= 4.7
    _wait_readable = anyio.wait_readable
else:  # pragma: no cover - older anyio
    _wait_readable = anyio.wait_socket_readable


class UDPDiscovery(Discovery):
    """Finds peers on the local network by periodic UDP broadcast."""

    def __init__(
        self,
        self_info: PeerInfo,
        listen_port: int,
        broadcast_address: str = "255.255.255.255",
        bind_address: str = "0.0.0.0",
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
        secret: str = "",
    ) -> None:
        if not 1 <= listen_port <= 65535:
            raise ValueError(f"listen_port must be in 1..65535, got {listen_port}")
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"interval_s and timeout_s must be positive, got {interval_s}, {timeout_s}")
        if timeout_s <= interval_s:
            log.warning("timeout_s (%s) <= interval_s (%s): peers will flap", timeout_s, interval_s)
        self.self_info = self_info
        self.listen_port = listen_port
        self.broadcast_address = broadcast_address
        self.bind_address = bind_address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.secret = secret
        self.malformed = 0  # datagrams on our port that were not valid announcements
        self._seen: dict[str, tuple[PeerInfo, float]] = {}  # node_id -> (info, monotonic last heard)

    def peers(self) -> dict[str, PeerInfo]:
        # Filter by age here too, so the view is right even between two prune passes.
        horizon = time.monotonic() - self.timeout_s
        return {k: info for k, (info, seen) in self._seen.items() if seen >= horizon}

    def _open_sockets(self) -> tuple[socket.socket, socket.socket]:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            rx.bind((self.bind_address, self.listen_port))
            rx.setblocking(False)
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            tx.setblocking(False)
        except BaseException:
            rx.close()
            tx.close()
            raise
        return rx, tx

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        rx, tx = self._open_sockets()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._receive_loop, rx)
                tg.start_soon(self._announce_loop, tx)
                task_status.started()
        finally:
            rx.close()
            tx.close()

    async def _announce_loop(self, tx: socket.socket) -> None:
        """Announce ourselves and prune silent peers, once per interval."""
        datagram = encode_announcement(self.self_info, self.secret)
        destination = (self.broadcast_address, self.listen_port)
        failing = False
        while True:
            try:
                tx.sendto(datagram, destination)
            except OSError as e:  # network down, buffer full: try again next interval
                # Warn when it starts failing, not once a second for as long as it fails.
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "discovery broadcast to %s:%d failed: %s",
                    *destination,
                    e,
                )
                failing = True
            else:
                if failing:
                    log.info("discovery broadcast to %s:%d works again", *destination)
                failing = False
            self._prune()
            await anyio.sleep(self.interval_s)

    def _prune(self) -> None:
        horizon = time.monotonic() - self.timeout_s
        for node_id, (_, seen) in list(self._seen.items()):
            if seen < horizon:
                del self._seen[node_id]
                log.info("peer %s not heard from for %.1fs; dropped", node_id, self.timeout_s)

    async def _receive_loop(self, rx: socket.socket) -> None:
        while True:
            await _wait_readable(rx)
            while True:
                try:
                    data, addr = rx.recvfrom(_MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # e.g. ICMP-reported errors on some platforms
                    log.warning("discovery receive failed: %s", e)
                    break
                self._handle(data, addr)

    def _handle(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._count_malformed(addr, f"undecodable ({e})")
            return
        if msg.version != PROTOCOL_VERSION:
            self._count_malformed(addr, f"protocol version {msg.version}, expected {PROTOCOL_VERSION}")
            return
        if not auth.signed_by(self.secret, _signed_part(msg), msg.mac):
            self._count_malformed(addr, "not signed with the cluster secret")
            return
        peer = msg.peer
        if peer.node_id == self.self_info.node_id:
            return  # our own broadcast, looped back
        if peer.host in _UNSPECIFIED_HOSTS:
            peer = msgspec.structs.replace(peer, host=addr[0])
        previous = self._seen.get(peer.node_id)
        if previous is None or previous[0] != peer:
            log.info("peer %s at %s:%d (%d bytes memory)", peer.node_id, peer.host, peer.port, peer.memory)
        self._seen[peer.node_id] = (peer, time.monotonic())

    def _count_malformed(self, addr: tuple[str, int], why: str) -> None:
        self.malformed += 1
        # The first one is worth a warning (misconfigured port?); after that, noise on the LAN.
        level = logging.WARNING if self.malformed == 1 else logging.DEBUG
        log.log(level, "dropped datagram from %s:%d: %s (%d dropped so far)", addr[0], addr[1], why, self.malformed)

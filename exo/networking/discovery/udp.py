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

Every announcement claims a concrete address: a node whose host is unspecified ("0.0.0.0", "::",
"") fills in the address its datagrams leave from (the kernel's choice for the broadcast
destination, asked by `connect()`ing a UDP socket there: 127.0.0.1 for 127.255.255.255); a node
with a host of its own sends from that address (its socket is bound to it).

With a cluster secret, an announcement is signed (`mac`, HMAC-SHA256 under the secret) over all
its fields: the PeerInfo with that host, the sender's wall-clock `sent_at`, a random `boot` id
drawn once per node life, and a `seq` that grows with every announcement of that boot. A node
with the secret drops (counts in `malformed`, logs why) an announcement whose MAC does not check,
whose claimed host is not the datagram's source address, whose `sent_at` is more than
`FRESHNESS_S` (60 s) from its own clock, or that is not newer than the last one it accepted from
that node id: same boot and a seq not above the last, or another boot with a `sent_at` not above
the last (a restart is accepted, a replay of an earlier life is not). So a listener who captures
an announcement can neither replay it (refused as old) nor replay it from elsewhere to move the
peer to itself (refused for the address), and cannot forge one. Spoofing the source address gains
nothing either: the peer stays where it is. An active attacker can still drop announcements, and
so make a peer disappear. Members' clocks must agree within FRESHNESS_S (NTP). See
exo/networking/auth.py for the RPC side and the advice to run over a VPN.

Without a secret nothing is authenticated and anything goes: anyone on the LAN can announce any
peer at any address. Receivers then also accept an unspecified host and substitute the datagram's
source address (what nodes of protocol version 1 sent), so an unconfigured LAN still works.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import socket
import time
from typing import Final, Literal, NamedTuple

import anyio
import msgspec
from anyio.abc import TaskStatus

from exo.networking import auth
from exo.networking.discovery.base import Discovery
from exo.networking.peer_info import PeerInfo

log = logging.getLogger("exo.discovery.udp")

ANNOUNCE_TYPE: Final = "exo-spec/announce"
PROTOCOL_VERSION = 2  # 2: announcements claim a concrete host and carry sent_at, boot and seq
FRESHNESS_S: Final = auth.FRESHNESS_S
_MAX_DATAGRAM = 65535
_UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::")


class Announcement(msgspec.Struct, frozen=True):
    """One node saying "I am here". `type` is required and must match exactly: it is the magic
    that makes datagrams from other programs on the port fail to decode instead of being misread."""

    type: Literal["exo-spec/announce"]
    version: int
    peer: PeerInfo  # its host is the address the datagram leaves from
    sent_at: float = 0.0  # the sender's wall clock (time.time())
    boot: str = ""  # random, drawn once per node life: tells a restart from a replay
    seq: int = 0  # grows with every announcement of one boot
    mac: bytes = b""  # HMAC of the other fields under the cluster secret (empty without one)


class _Latest(NamedTuple):
    """The newest announcement accepted from one node id, against which replays are refused."""

    boot: str
    seq: int
    sent_at: float
    heard: float  # time.monotonic() when accepted


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Announcement)


def _signed_part(msg: Announcement) -> bytes:
    return _encoder.encode(msgspec.structs.replace(msg, mac=b""))


def encode_announcement(peer: PeerInfo, secret: str = "", *, boot: str | None = None, seq: int = 0,
                        sent_at: float | None = None) -> bytes:
    """The datagram a node broadcasts about itself (`peer.host` must be the address it is sent
    from); a fresh random boot id and the current time unless given."""
    msg = Announcement(type=ANNOUNCE_TYPE, version=PROTOCOL_VERSION, peer=peer,
                       sent_at=time.time() if sent_at is None else sent_at,
                       boot=os.urandom(8).hex() if boot is None else boot, seq=seq)
    return _encoder.encode(msgspec.structs.replace(msg, mac=auth.sign(secret, _signed_part(msg))))


def source_address(destination: tuple[str, int]) -> str:
    """The address a datagram to `destination` leaves from, as the kernel routes it: connecting
    a UDP socket picks it without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)  # connect() to a broadcast address needs it
        probe.connect(destination)
        return probe.getsockname()[0]


def _same_address(claimed: str, source: str) -> bool:
    try:
        return ipaddress.ip_address(claimed) == ipaddress.ip_address(source)
    except ValueError:  # a host name, or garbage: not the address the datagram came from
        return False


def _is_newer(msg: Announcement, last: _Latest) -> bool:
    """Same life: a higher seq. Another life: a later time (a restart, not an old life replayed)."""
    return msg.seq > last.seq if msg.boot == last.boot else msg.sent_at > last.sent_at


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
        self.malformed = 0  # datagrams on our port that were not valid (or not fresh) announcements
        self._seen: dict[str, tuple[PeerInfo, float]] = {}  # node_id -> (info, monotonic last heard)
        self._latest: dict[str, _Latest] = {}  # node_id -> newest accepted (with a secret), outlives _seen
        self._boot = os.urandom(8).hex()
        self._seq = itertools.count(1)
        self._source: str | None = None  # the address our sending socket is bound to, when it is

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
            self._bind_source(tx)
        except BaseException:
            rx.close()
            tx.close()
            raise
        return rx, tx

    def _bind_source(self, tx: socket.socket) -> None:
        """Send from the host we announce, so that receivers can check the claim against the source."""
        host = self.self_info.host
        if host in _UNSPECIFIED_HOSTS:
            return  # the kernel picks the source; each announcement asks which (`source_address`)
        try:
            address = socket.gethostbyname(host)
            tx.bind((address, 0))
        except OSError as e:
            log.warning("cannot send discovery announcements from %s (%s): they leave from another address, "
                        "which nodes with the cluster secret refuse", host, e)
            return
        self._source = address

    def _claimed_host(self, destination: tuple[str, int]) -> str:
        if self._source is not None:
            return self._source
        if self.self_info.host in _UNSPECIFIED_HOSTS:
            return source_address(destination)  # asked each time: the address may change (DHCP)
        return self.self_info.host

    def _next_datagram(self, destination: tuple[str, int]) -> bytes:
        """This interval's announcement: a concrete host, the time now, the next seq, signed."""
        peer = msgspec.structs.replace(self.self_info, host=self._claimed_host(destination))
        return encode_announcement(peer, self.secret, boot=self._boot, seq=next(self._seq))

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
        destination = (self.broadcast_address, self.listen_port)
        failing = False
        while True:
            try:
                tx.sendto(self._next_datagram(destination), destination)
            except OSError as e:  # network down (no route), buffer full: try again next interval
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
        # Past two windows, anything a listener captured from that node is stale anyway.
        forget = time.monotonic() - 2 * FRESHNESS_S
        for node_id, latest in list(self._latest.items()):
            if latest.heard < forget:
                del self._latest[node_id]

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
        if self.secret:
            why = self._admit(msg, addr[0])
            if why is not None:
                self._count_malformed(addr, why)
                return
        elif peer.host in _UNSPECIFIED_HOSTS:  # no secret, no checks: trust the source address
            peer = msgspec.structs.replace(peer, host=addr[0])
        previous = self._seen.get(peer.node_id)
        if previous is None or previous[0] != peer:
            log.info("peer %s at %s:%d (%d bytes memory)", peer.node_id, peer.host, peer.port, peer.memory)
        self._seen[peer.node_id] = (peer, time.monotonic())

    def _admit(self, msg: Announcement, source: str) -> str | None:
        """Why a signed announcement is refused (None: accepted, and remembered as the newest)."""
        if not _same_address(msg.peer.host, source):
            return f"claims host {msg.peer.host!r} but comes from {source}"
        age = time.time() - msg.sent_at
        if not abs(age) <= FRESHNESS_S:  # written so that a NaN is refused too
            return f"not fresh: sent {age:.0f} s ago, more than {FRESHNESS_S} s from this node's clock"
        last = self._latest.get(msg.peer.node_id)
        if last is not None and not _is_newer(msg, last):
            return f"replayed: boot {msg.boot} seq {msg.seq} is not newer than boot {last.boot} seq {last.seq}"
        self._latest[msg.peer.node_id] = _Latest(msg.boot, msg.seq, msg.sent_at, time.monotonic())
        return None

    def _count_malformed(self, addr: tuple[str, int], why: str) -> None:
        self.malformed += 1
        # The first one is worth a warning (misconfigured port?); after that, noise on the LAN.
        level = logging.WARNING if self.malformed == 1 else logging.DEBUG
        log.log(level, "dropped datagram from %s:%d: %s (%d dropped so far)", addr[0], addr[1], why, self.malformed)

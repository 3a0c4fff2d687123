"""The cluster secret: who may talk to a node's RPC port and announce itself on the LAN.

The secret itself never crosses the network. Every gRPC call carries one header,

    x-exo-auth: <unix time, s>.<random nonce, hex>.<hex HMAC-SHA256(secret, method|time|nonce|sha256(request))>

and the server (`CallGuard`) recomputes the MAC from the method it serves and the request bytes it
received, refuses a time more than `FRESHNESS_S` away from its own clock, and remembers every
nonce it accepted for twice that window, so a captured call cannot be sent again. UDP
announcements carry an HMAC of their fields (`sign`), which bind the address they claim and a
time (see exo/networking/discovery/udp.py). Members' clocks must agree within `FRESHNESS_S`
(NTP does this).

Threat model. A passive listener on the LAN sees every call in the clear (prompts, hidden
states, tokens) but cannot learn the secret, reuse a call or an announcement, or move or inject
a peer. An active man in the middle can still drop, delay (within the window) or reorder
messages, and alter replies, which are not authenticated (a Health reply, a Generate stream).
The MAC names the node a call is for (`addressed`), so a call captured on its way to one
member cannot be replayed to another either. The secret proves membership, nothing more: for
confidentiality and integrity run the cluster inside a VPN (WireGuard, Tailscale).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from typing import Callable, Final, Iterable

HEADER: Final = "x-exo-auth"  # gRPC metadata keys are lower case
ENV_VAR: Final = "EXO_CLUSTER_SECRET"
FRESHNESS_S: Final = 60  # how far a call's or an announcement's time may be from the receiver's clock
MAX_NONCES: Final = 100_000  # replay cache bound; past it, the oldest go and their times become too old

Metadata = Iterable[tuple[str, str | bytes]]


def secret_from(flag: str | None) -> str:
    """The secret from the flag, else from the environment (which keeps it out of `ps`)."""
    return flag if flag is not None else os.environ.get(ENV_VAR, "")


def addressed(node_id: str, method: str) -> str:
    """What a call's MAC names: the method and the node it is for."""
    return f"{node_id}/{method}"


def _call_mac(secret: str, method: str, sent_at: int, nonce: str, payload: bytes) -> str:
    message = f"{method}|{sent_at}|{nonce}|{hashlib.sha256(payload).hexdigest()}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def call_metadata(secret: str, method: str, payload: bytes, *, now: float | None = None,
                  nonce: str | None = None) -> tuple[tuple[str, str], ...]:
    """The header one call carries (none without a secret): it proves the secret for this
    method and request only, once. `now` and `nonce` are for tests."""
    if not secret:
        return ()
    sent_at = int(time.time() if now is None else now)
    nonce = os.urandom(16).hex() if nonce is None else nonce
    return ((HEADER, f"{sent_at}.{nonce}.{_call_mac(secret, method, sent_at, nonce, payload)}"),)


def _header(metadata: Metadata | None) -> str | None:
    value = next((value for key, value in metadata or () if key == HEADER), None)
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return value


class CallGuard:
    """A server's check of its callers: right MAC, fresh time, nonce not seen before.
    Only calls whose MAC checks enter the nonce cache, so strangers cannot fill it."""

    def __init__(self, secret: str, *, window_s: float = FRESHNESS_S, max_nonces: int = MAX_NONCES,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret, self.window_s, self.max_nonces, self._clock = secret, window_s, max_nonces, clock
        self._nonces: OrderedDict[str, tuple[float, int]] = OrderedDict()  # nonce -> (forget at, sent_at)
        self._floor = -1  # sent_at of the newest evicted nonce: calls this old cannot be checked any more

    def refusal(self, method: str, payload: bytes, metadata: Metadata | None) -> str | None:
        """Why this call must be refused, or None when it may pass (always, without a secret)."""
        if not self.secret:
            return None
        header = _header(metadata)
        if header is None:
            return f"no {HEADER} header"
        sent_at_text, _, rest = header.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (sent_at_text.isascii() and sent_at_text.isdigit() and len(sent_at_text) <= 20) or not nonce:
            return f"malformed {HEADER} header"
        sent_at = int(sent_at_text)
        expected = _call_mac(self.secret, method, sent_at, nonce, payload)
        if not hmac.compare_digest(mac.encode(errors="replace"), expected.encode()):
            return "wrong MAC (wrong secret, or a header made for another call)"
        if abs(self._clock() - sent_at) > self.window_s:
            return f"stale: sent at {sent_at}, more than {self.window_s:.0f} s from this node's clock"
        return self._remember(nonce, sent_at)

    def _remember(self, nonce: str, sent_at: int) -> str | None:
        now = time.monotonic()
        while self._nonces and next(iter(self._nonces.values()))[0] < now:
            self._nonces.popitem(last=False)
        if nonce in self._nonces or sent_at <= self._floor:
            return "replayed (nonce already seen)"
        # Kept for 2 windows: a header can pass until its sent_at + window, at most 2 windows from now.
        self._nonces[nonce] = (now + 2 * self.window_s, sent_at)
        while len(self._nonces) > self.max_nonces:
            _, (_, evicted_at) = self._nonces.popitem(last=False)
            self._floor = max(self._floor, evicted_at)
        return None


def sign(secret: str, payload: bytes) -> bytes:
    """HMAC-SHA256 of `payload` under the secret (empty without one)."""
    return hmac.digest(secret.encode(), payload, hashlib.sha256) if secret else b""


def signed_by(secret: str, payload: bytes, mac: bytes) -> bool:
    """Whether `mac` is the secret's HMAC of `payload` (always, when this node has no secret)."""
    return not secret or hmac.compare_digest(mac, sign(secret, payload))


def is_loopback(host: str) -> bool:
    """Whether a bind address keeps a server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond loopback

"""Who may use the API: the Host names it serves, an optional bearer key, and JSON-only POSTs.

Requiring `application/json` on every POST means a web page cannot drive a node on the
LAN with a "simple" cross-origin request: the browser must send a CORS preflight first,
which this API never answers with permission. Answering only known Host names stops DNS
rebinding: a page on evil.example that re-points its own name at the node's address still
sends `Host: evil.example`, and gets 421 Misdirected Request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
from typing import Iterable

import msgspec
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from exo.api.schemas import ErrorBody, ErrorResponse
from exo.networking.auth import is_loopback

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()
OPEN_PATHS = frozenset({"/healthcheck"})
ANY_HOST = "*"


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the key's length too.
    return hashlib.sha256(value).digest()


def host_name(host: str) -> tuple[str, bool] | None:
    """(name, whether it is an IP literal) of a Host header value, lower-cased, its port and a
    trailing dot dropped; None when it is not a well-formed host[:port]."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6: the only form an address of version 6 takes in a Host header
        literal, sep, rest = host[1:].partition("]")
        if not sep or rest and not (rest[0] == ":" and rest[1:].isdigit()) or not _is_ip(literal, 6):
            return None
        return literal, True
    name, sep, port = host.partition(":")
    if sep and not port.isdigit() or not name:
        return None
    name = name[:-1] if name.endswith(".") else name
    return name, _is_ip(name, 4)


def _is_ip(value: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def default_host_names() -> frozenset[str]:
    """Names that reach this machine without anyone else's DNS: localhost and its own name."""
    own = socket.gethostname().lower().rstrip(".")
    short = own.split(".", 1)[0]
    return frozenset(name for name in ("localhost", own, short, f"{short}.local" if short else "") if name)


def parse_allowed_hosts(values: Iterable[str] | None) -> list[str] | None:
    """`--allowed-hosts` values (repeatable, each comma-separated) as one list; None: the default."""
    names = [part.strip() for value in values or () for part in value.split(",") if part.strip()]
    return names or None


class HostFilter:
    """Which Host headers the API answers: IP literals always (DNS rebinding needs a name),
    and the names allowed (default: localhost and this machine's name, also with `.local`),
    any port; ANY_HOST among them allows every Host."""

    def __init__(self, allowed: Iterable[str] | None = None):
        entries = default_host_names() if allowed is None else list(allowed)
        self.any = ANY_HOST in entries
        parsed = (host_name(entry) for entry in entries if entry != ANY_HOST)
        self.names = frozenset(name for name, _ in filter(None, parsed))

    def allows(self, host: str | None) -> bool:
        if self.any:
            return True
        parsed = host_name(host) if host is not None else None
        return parsed is not None and (parsed[1] or parsed[0] in self.names)


class AccessGuard:
    """ASGI middleware: 421 for a Host name the API does not serve (every path), 401 without
    the right `Authorization: Bearer <key>` (when a key is set, on every path but OPEN_PATHS),
    415 for a POST whose body is not declared as JSON."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, allowed_hosts: Iterable[str] | None = None):
        self.app = app
        # The key's UTF-8 bytes (surrogateescape: the bytes of a non-UTF-8 argv) are what a client sends.
        self._key = _digest(api_key.encode("utf-8", "surrogateescape")) if api_key else None
        self._hosts = HostFilter(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self._hosts.allows(host):
            await _refuse(send, 421, _misdirected(host), "host_not_allowed")
            return
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _refuse(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                          "invalid_api_key", {"www-authenticate": "Bearer"})
            return
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                await _refuse(send, 415, f"unsupported content type {media_type or 'none'!r}: "
                              "POST bodies must be application/json", "unsupported_media_type")
                return
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client
        # sent, compared with the key's UTF-8 (so a non-ASCII key can match).
        raw = headers.get("authorization", "").encode("latin-1")
        scheme, _, token = raw.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(_digest(token.strip(b" \t")), self._key)


def _misdirected(host: str | None) -> str:
    if host is None:
        return "a request must name its host (the Host header)"
    shown = host if len(host) <= 80 else host[:77] + "..."
    return f"this node does not serve the host {shown!r}; its operator can allow it with --allowed-hosts"


async def _refuse(send: Send, status: int, message: str, code: str, extra: dict[str, str] | None = None) -> None:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = _json.encode(ErrorResponse(ErrorBody(message, kind, None, code)))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Log a warning (and say so) when the API listens beyond loopback with no key."""
    if api_key or is_loopback(host):
        return False
    log.warning("the API listens on %s without an API key: anyone who can reach this machine can generate, "
                "read the metrics and event stream, and make the node fetch models. Pass --api-key "
                "(or set EXO_API_KEY), or --host 127.0.0.1.", host)
    return True

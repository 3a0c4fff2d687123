"""Who may use the API: an optional bearer key, and JSON-only POSTs.

Requiring `application/json` on every POST means a web page cannot drive a node on the
LAN with a "simple" cross-origin request: the browser must send a CORS preflight first,
which this API never answers with permission.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import msgspec
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from exo.api.schemas import ErrorBody, ErrorResponse
from exo.networking.auth import is_loopback

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()
OPEN_PATHS = frozenset({"/healthcheck"})


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the key's length too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class AccessGuard:
    """ASGI middleware: 401 without the right `Authorization: Bearer <key>` (when a key is set,
    on every path but OPEN_PATHS), 415 for a POST whose body is not declared as JSON."""

    def __init__(self, app: ASGIApp, api_key: str | None = None):
        self.app = app
        self._key = _digest(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
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
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._key)


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

"""One table from the layers' errors to OpenAI-style error bodies.

Every layer raises its own exceptions (a config the request got wrong, a context too long,
a full queue, a failed ring stage); the API maps them here and nowhere else, whether the
error ends a JSON response or arrives in the middle of an event stream.
"""

from __future__ import annotations

from typing import Callable

import msgspec
from starlette.responses import Response

from exo.api.choices import ChoiceError
from exo.api.limits import Refused
from exo.api.schemas import ErrorBody, ErrorResponse
from exo.inference.cache_table import CacheTableFull
from exo.inference.engine import ContextLengthError
from exo.inference.sources import ModelSourceError
from exo.models import UnknownModelError
from exo.orchestration.admission import AdmissionRejected
from exo.orchestration.node import ModelNotOnDisk
from exo.orchestration.ring_stage import RingError
from exo.speculative.config import ConfigError

_json = msgspec.json.Encoder()


class APIError(Exception):
    """An error the client gets as it is: status, OpenAI error body, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse(ErrorBody(message, kind, param, code))
        self.headers = headers

    def response(self) -> Response:
        return json_response(self.body, self.status, self.headers)

    def event(self) -> bytes:
        """The error as one server-sent event (a stream that has started cannot change its status)."""
        return b"data: " + _json.encode(self.body) + b"\n\n"


# Subclasses before their bases: the first match wins.
TABLE: list[tuple[type[Exception], Callable[[Exception], APIError]]] = [
    (APIError, lambda e: e),
    (Refused, lambda e: APIError(e.status, e.message, e.param, e.code, e.kind)),
    (ChoiceError, lambda e: APIError(400, str(e), e.param)),
    (ConfigError, lambda e: APIError(400, str(e), "speculative")),
    (ContextLengthError, lambda e: APIError(400, str(e), "max_tokens", "context_length_exceeded")),
    (ModelNotOnDisk, lambda e: APIError(404, str(e), "model", "model_not_on_disk")),
    (UnknownModelError, lambda e: APIError(404, str(e), "model", "model_not_found")),
    (ModelSourceError, lambda e: APIError(503, f"model unavailable: {e}", "model", "model_unavailable",
                                          "server_error")),
    # A failed stage or peer: the request cannot be served now; the cluster may heal.
    (RingError, lambda e: APIError(503, f"cluster: {e}", None, "ring_failed", "server_error")),
    # Not admitted (queue full, no slot in time, its draft busy): 429, and when to come back.
    (AdmissionRejected, lambda e: APIError(429, str(e), None, e.reason, "rate_limit_error",
                                           {"Retry-After": str(e.retry_after_s)})),
    (CacheTableFull, lambda e: APIError(503, str(e), None, "cache_full", "server_error")),
]
HANDLED = tuple(kind for kind, _ in TABLE)


def api_error(exc: Exception) -> APIError | None:
    """The client's view of `exc`; None for a bug (an internal error)."""
    for kind, make in TABLE:
        if isinstance(exc, kind):
            return make(exc)
    return None


def refusal(exc: Exception) -> Response:
    """The response to a request refused before its stream started (its admission, say)."""
    error = api_error(exc)
    return (error or internal_error(exc)).response()


def internal_error(exc: Exception, what: str = "internal error") -> APIError:
    """A bug, not the client's fault (the caller logs its traceback)."""
    return APIError(500, f"{what}: {type(exc).__name__}: {exc}", None, "internal_error", "server_error")


def json_response(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(value), status_code=status, media_type="application/json", headers=headers)

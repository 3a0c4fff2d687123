"""ChatGPT-compatible API on port 52415, plus speculative metrics and an event stream.

Every failure a client can cause is a 4xx with an OpenAI-style error body; a client that
disconnects cancels its generation (which frees its KV caches); requests never share a
cache because each has its own request id all the way down.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exo.api import prometheus
from exo.api.admitted import AdmittedResponse
from exo.api.schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, Usage
from exo.inference.cache_table import CacheTableFull
from exo.inference.text_stream import TextStream
from exo.inference.generate import GenerationParams
from exo.inference.sources import ModelSourceError
from exo.models import CARDS, UnknownModelError
from exo.networking.grpc_transport import PeerError
from exo.orchestration.admission import AdmissionRejected
from exo.orchestration.node import Node
from exo.orchestration.ring_stage import RingError
from exo.speculative.config import ConfigError

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse(ErrorBody(message, kind, param, code))
        self.headers = headers


CLUSTER_ERRORS = (RingError, PeerError)


def _cluster_error(exc: Exception) -> APIError:
    """A failed stage or peer: the request cannot be served now; the cluster may heal."""
    return APIError(503, f"cluster: {exc}", None, "ring_failed", "server_error")


def _rejected(exc: AdmissionRejected) -> APIError:
    """Not admitted (queue full, or no slot in time): 429, and when to come back."""
    return APIError(429, str(exc), None, exc.reason, "rate_limit_error", {"Retry-After": str(exc.retry_after_s)})


def _json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(value), status_code=status, media_type="application/json", headers=headers)


class ChatGPTAPI:
    def __init__(self, node: Node, disconnect_poll_s: float = 0.25):
        self.node = node
        self.disconnect_poll_s = disconnect_poll_s
        self.app = Starlette(routes=[
            Route("/healthcheck", self.healthcheck),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/speculative/metrics", self.metrics),
            Route("/v1/speculative/events", self.events),
            Route("/v1/topology", self.topology),
            Route("/metrics", self.prometheus_metrics),
        ], exception_handlers={APIError: self._api_error, 404: self._not_found, 405: self._not_allowed,
                               Exception: self._internal_error})

    # -- errors ------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: APIError) -> Response:
        return _json_response(exc.body, exc.status, exc.headers)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug, not the client's fault: logged with its traceback, answered in the API's format."""
        log.error("internal error serving %s", request.url.path, exc_info=exc)
        body = ErrorResponse(ErrorBody(f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                       code="internal_error"))
        return _json_response(body, 500)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _json_response(ErrorResponse(ErrorBody(f"no route {request.url.path}", code="not_found")), 404)

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _json_response(ErrorResponse(ErrorBody(f"{request.method} not allowed on {request.url.path}",
                                                     code="method_not_allowed")), 405)

    # -- simple endpoints ----------------------------------------------------------------
    async def healthcheck(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node_id": self.node.id})

    async def models(self, request: Request) -> Response:
        data = [{"id": card_id, "object": "model", "owned_by": "exo", "created": 0, "ready": True}
                for card_id in sorted(CARDS)]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        engines = {"target": self.node.engine.target.name, "draft": self.node.engine.draft.name}
        return _json_response({"node_id": self.node.id, "engines": engines, "totals": self.node.engine.get_metrics(),
                              "recent": list(self.node.recent), "cluster": self.node.cluster_metrics(),
                              "live_requests": self.node.live_requests(), "queued_requests": self.node.admission.queued})

    async def prometheus_metrics(self, request: Request) -> Response:
        """The node's counters for a Prometheus scraper (text exposition format 0.0.4)."""
        return Response(prometheus.exposition(self.node), media_type=prometheus.CONTENT_TYPE)

    async def topology(self, request: Request) -> Response:
        """The nodes this node can reach and the ring the current model runs on."""
        return _json_response(self.node.topology())

    async def events(self, request: Request) -> Response:
        """Server-sent events: every speculative event of this node, as JSON."""
        async def stream() -> AsyncIterator[bytes]:
            with self.node.events.subscribe() as subscription:
                async for event in subscription:
                    yield b"data: " + _json.encode(event) + b"\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- completions ---------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        tokenizer = await self._tokenizer(body.model)
        prompt = tokenizer.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        return await self._respond(request, body, tokenizer.encode(prompt), chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        if not prompt:
            raise APIError(400, "prompt must be a non-empty string", "prompt")
        tokenizer = await self._tokenizer(body.model)
        return await self._respond(request, body, tokenizer.encode(prompt), chat=False)

    async def _parse(self, request: Request, kind: type) -> Any:
        raw = await request.body()
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise APIError(400, f"invalid request: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise APIError(400, f"malformed JSON: {exc}") from exc

    async def _tokenizer(self, model: str | None):
        try:
            await self.node.shard_for(model)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), "model", "model_not_found") from exc
        except ModelSourceError as exc:
            raise APIError(503, f"model unavailable: {exc}", "model", "model_unavailable", "server_error") from exc
        except CLUSTER_ERRORS as exc:
            raise _cluster_error(exc) from exc
        return self.node.tokenizer

    def _settings(self, body: Any):
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          self.node.max_generate_tokens)
        try:
            params = GenerationParams(
                max_tokens=max_tokens,
                temperature=self.node.default_temperature if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        try:
            config = self.node.config.merged(body.speculative.fields()) if body.speculative else self.node.config
            if config.enabled:
                from exo.speculative.config import choose_draft
                choose_draft(body.model or self.node.default_model, config.draft_model)
        except ConfigError as exc:
            raise APIError(400, str(exc), "speculative") from exc
        return params, config

    async def _respond(self, request: Request, body: Any, prompt: list[int],
                       chat: bool) -> Response | AdmittedResponse:
        params, config = self._settings(body)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.model or self.node.default_model
        tokenizer = self.node.tokenizer
        text = TextStream(tokenizer, body.stops(), tokenizer.eos_token_ids)
        created = int(time.time())

        async def deltas() -> AsyncIterator[tuple[str, int]]:
            """(text delta, 1) per generated token, until the budget, end of sequence or a stop string."""
            try:
                async with aclosing(self.node.generate(model, prompt, params, config, request_id)) as blocks:
                    async for tokens in blocks:
                        for token in tokens:
                            yield text.push(token), 1
                            if text.stopped:
                                return
            except ConfigError as exc:
                raise APIError(400, str(exc), "speculative") from exc
            except CLUSTER_ERRORS as exc:
                raise _cluster_error(exc) from exc
            except AdmissionRejected as exc:  # by the draft node this request was forwarded to
                raise _rejected(exc) from exc
            except CacheTableFull as exc:
                raise APIError(503, str(exc), None, "cache_full", "server_error") from exc

        def finish_reason() -> str:
            if text.stopped:
                return "stop"
            outcome = self.node.outcome(request_id)
            return (outcome.finish_reason if outcome else None) or "stop"

        def usage(completion_tokens: int) -> Usage:
            outcome = self.node.outcome(request_id)
            extra = None
            if outcome is not None and outcome.metrics is not None and config.enabled:
                snap = outcome.metrics
                extra = {"drafted_tokens": snap.drafted_tokens, "accepted_tokens": snap.accepted_tokens,
                         "acceptance_rate": snap.acceptance_rate,
                         "mean_accepted_length": snap.mean_accepted_length}
            return Usage(len(prompt), completion_tokens, len(prompt) + completion_tokens, extra)

        if body.stream:  # admitted before the 200 goes out; the slot is held for the whole stream
            stream = StreamingResponse(self._sse(request_id, model, created, chat, deltas(), text.flush,
                                                 finish_reason, usage),
                                       media_type="text/event-stream")
            return AdmittedResponse(lambda: self.node.admit(request_id), stream,
                                    lambda exc: self._refusal(_rejected(exc)))
        pieces, count, error = [], 0, None
        async with anyio.create_task_group() as group:
            group.start_soon(self._cancel_on_disconnect, request, group.cancel_scope)
            try:
                async with self.node.admit(request_id), aclosing(deltas()) as stream:
                    async for delta, n in stream:
                        pieces.append(delta)
                        count += n
                pieces.append(text.flush())
            except AdmissionRejected as exc:
                error = _rejected(exc)
            except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                error = exc
            group.cancel_scope.cancel()
        if error is not None:
            raise error
        if await request.is_disconnected():
            return Response(status_code=499)
        content = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat
                  else {"index": 0, "text": content, "logprobs": None})
        choice["finish_reason"] = finish_reason()
        return _json_response({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                              "created": created, "model": model, "choices": [choice], "usage": usage(count)})

    def _refusal(self, error: APIError) -> Response:
        return _json_response(error.body, error.status, error.headers)

    async def _cancel_on_disconnect(self, request: Request, scope: anyio.CancelScope) -> None:
        while not await request.is_disconnected():
            await anyio.sleep(self.disconnect_poll_s)
        log.info("client disconnected; cancelling its generation")
        scope.cancel()

    async def _sse(self, request_id: str, model: str, created: int, chat: bool,
                   deltas: AsyncIterator[tuple[str, int]], tail: Callable[[], str],
                   finish_reason: Callable[[], str], usage: Callable[[int], Usage]) -> AsyncIterator[bytes]:
        """One chunk per token, then a final chunk (held-back text, finish_reason, usage), then [DONE]."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, extra: dict | None = None, first: bool = False) -> bytes:
            if chat:
                payload = {"role": "assistant", "content": delta} if first else (
                    {"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": payload, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}
            return b"data: " + _json.encode({**body, **(extra or {})}) + b"\n\n"

        count = 0
        first = True
        try:
            async with aclosing(deltas) as stream:
                async for delta, n in stream:
                    count += n  # one chunk per generated token, even while its text is held back
                    yield chunk(delta, None, first=first)
                    first = False
            yield chunk(tail() or None, finish_reason(), {"usage": msgspec.to_builtins(usage(count))})
        except APIError as exc:
            yield b"data: " + _json.encode(exc.body) + b"\n\n"
        except Exception as exc:  # the stream has started; report in-band rather than drop the connection
            log.exception("generation failed in %s", request_id)
            error = ErrorResponse(ErrorBody(f"generation failed: {exc}", "server_error"))
            yield b"data: " + _json.encode(error) + b"\n\n"
        yield b"data: [DONE]\n\n"

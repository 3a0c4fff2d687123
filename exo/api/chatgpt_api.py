"""ChatGPT-compatible API on port 52415, plus speculative metrics and an event stream.

Every failure a client can cause is a 4xx with an OpenAI-style error body; a client that
disconnects cancels its generation (which frees its KV caches); requests never share a
cache because each has its own request id all the way down.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, AsyncIterator, Iterable

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exo.api import limits, prometheus
from exo.api.access import AccessGuard
from exo.api.admitted import AdmittedResponse
from exo.api.choices import requested_choices, requested_logprobs
from exo.api.completion import Completion
from exo.api.errors import HANDLED, APIError, api_error, internal_error, json_response, refusal
from exo.api.limits import Limits
from exo.api.produced import ProducedStream
from exo.api.schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, Message
from exo.api.unsupported import unrecognized_argument, unsupported_parameter
from exo.inference.generate import GenerationParams
from exo.inference.sources import ModelStore
from exo.models import UnknownModelError
from exo.orchestration.node import Node
from exo.speculative.config import AUTO, SpeculativeConfig, choose_draft

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()


class ChatGPTAPI:
    def __init__(self, node: Node, disconnect_poll_s: float = 0.25, *, api_key: str | None = None,
                 limits: Limits = Limits(), allowed_hosts: Iterable[str] | None = None):
        """`allowed_hosts`: the Host names the API answers (None: IP literals, localhost and this
        machine's name; "*": any), see AccessGuard."""
        self.node = node
        self.disconnect_poll_s = disconnect_poll_s
        self.limits = limits
        self.app = Starlette(routes=[
            Route("/healthcheck", self.healthcheck),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/speculative/metrics", self.metrics),
            Route("/v1/speculative/events", self.events),
            Route("/v1/topology", self.topology),
            Route("/metrics", self.prometheus_metrics),
        ], exception_handlers={**{kind: self._api_error for kind in HANDLED}, 404: self._not_found,
                               405: self._not_allowed, Exception: self._internal_error})
        self.app.add_middleware(AccessGuard, api_key=api_key, allowed_hosts=allowed_hosts)

    # -- errors (exo/api/errors.py maps every layer's to OpenAI's body) ----------------------
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        return api_error(exc).response()

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug, not the client's fault: logged with its traceback, answered in the API's format."""
        log.error("internal error serving %s", request.url.path, exc_info=exc)
        return internal_error(exc).response()

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return json_response(ErrorResponse(ErrorBody(f"no route {request.url.path}", code="not_found")), 404)

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return json_response(ErrorResponse(ErrorBody(f"{request.method} not allowed on {request.url.path}",
                                                     code="method_not_allowed")), 405)

    # -- simple endpoints ----------------------------------------------------------------
    async def healthcheck(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node_id": self.node.id})

    async def models(self, request: Request) -> Response:
        """Every model a request may name; `ready` means its weights are on disk (no fetch needed)."""
        store = ModelStore()
        loaded = self.node.loaded_model
        data = []
        for name, model_id in self.node.models.items():
            on_disk = await anyio.to_thread.run_sync(store.installed, model_id)
            data.append({"id": name, "object": "model", "owned_by": "exo", "created": 0, "ready": on_disk,
                         "on_disk": on_disk, "loaded": model_id == loaded})
        return JSONResponse({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        engine = self.node.engine
        engines = {"target": engine.target.name, "draft": engine.draft.name}
        batching = {"target": engine.target.batch_stats(), "draft": engine.draft.batch_stats()}
        return json_response({"node_id": self.node.id, "engines": engines, "totals": engine.get_metrics(),
                               "batching": batching,
                              "recent": list(self.node.recent), "cluster": self.node.cluster_metrics(),
                              "live_requests": self.node.live_requests(), "queued_requests": self.node.admission.queued})

    async def prometheus_metrics(self, request: Request) -> Response:
        """The node's counters for a Prometheus scraper (text exposition format 0.0.4)."""
        return Response(prometheus.exposition(self.node), media_type=prometheus.CONTENT_TYPE)

    async def topology(self, request: Request) -> Response:
        """The nodes this node can reach and the ring the current model runs on."""
        return json_response(self.node.topology())

    async def events(self, request: Request) -> Response:
        """Server-sent events: every speculative event of this node, as JSON."""
        async def stream() -> AsyncIterator[bytes]:
            with self.node.events.subscribe() as subscription:
                async for event in subscription:
                    yield b"data: " + _json.encode(event) + b"\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- completions ---------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest, chat=True)
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        _check_contents(body.messages)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        limit = self.limits.max_prompt_chars
        limits.check_prompt_chars(limits.chat_chars([m["content"] for m in messages]), limit, "messages")
        tokenizer = await self._tokenizer(body.model)
        # The template's cost grows with the chat: rendered and tokenized off the event loop.
        prompt = await anyio.to_thread.run_sync(tokenizer.chat_prompt, messages)
        limits.check_prompt_chars(len(prompt), limit, "messages")  # the template's own text counts too
        return await self._respond(request, body, [await anyio.to_thread.run_sync(tokenizer.encode, prompt)],
                                   chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest, chat=False)
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from exc
        if not prompts or not all(prompts):
            raise APIError(400, "prompt must be a non-empty string (or a list of them)", "prompt")
        limits.check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), self.limits.max_prompt_chars,
                                  "prompt")
        tokenizer = await self._tokenizer(body.model)
        return await self._respond(request, body, await anyio.to_thread.run_sync(_encoded, tokenizer, prompts),
                                   chat=False)

    async def _parse(self, request: Request, kind: type, chat: bool) -> Any:
        """The request body, decoded and checked: its sizes first (before anything loops over
        them), then its values, then its fields against what OpenAI's endpoint knows."""
        raw = await limits.read_body(request, self.limits.max_body_bytes)
        limits.check_depth(raw, self.limits.max_json_depth)
        try:
            body = msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise APIError(400, f"invalid request: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise APIError(400, f"malformed JSON: {exc}") from exc
        limits.check_stops(body.stops())
        n = requested_choices(body)  # ChoiceError: a 400 naming `n`
        if chat:
            limits.check_messages(len(body.messages), self.limits.max_messages)
        else:  # a list of token ids is one prompt; a mixed list is refused later (counted as a list here)
            listed = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
            limits.check_prompts(len(body.prompt) if listed else 1, n, self.limits.max_prompts)
        limits.check_sampling(body)
        fields = msgspec.json.decode(raw)
        unknown = unrecognized_argument(fields, chat)
        if unknown is not None:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown}", unknown,
                           "unrecognized_argument")
        refused = unsupported_parameter(fields, chat)
        if refused is not None:
            raise APIError(400, refused[1], refused[0], "unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        return body

    def _model_id(self, name: str | None, param: str = "model") -> str:
        """The node's model for a client's name (404, the same for any unknown name)."""
        try:
            return self.node.models.resolve(name or self.node.default_model)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param, "model_not_found") from exc

    async def _tokenizer(self, model: str | None):
        await self.node.shard_for(self._model_id(model))  # its errors map to 404 / 503 (exo/api/errors.py)
        return self.node.tokenizer

    def _settings(self, body: Any) -> tuple[GenerationParams, SpeculativeConfig]:
        """The request's sampling parameters and speculative config (the node's, with the
        request's `speculative` object merged in and checked by the config itself)."""
        max_tokens = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None),
                          self.node.max_generate_tokens)
        try:
            params = GenerationParams(
                max_tokens=max_tokens,
                temperature=self.node.default_temperature if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        overrides = dict(body.speculative or {})
        if isinstance(overrides.get("draft_model"), str) and overrides["draft_model"] != AUTO:
            overrides["draft_model"] = self._model_id(overrides["draft_model"], "speculative.draft_model")
        config = self.node.config.merged(overrides) if overrides else self.node.config
        if config.enabled:
            choose_draft(self._model_id(body.model), config.draft_model)
        return params, config

    async def _respond(self, request: Request, body: Any, prompts: list[list[int]],
                       chat: bool) -> Response | AdmittedResponse:
        """Settle the request's settings, then answer with its Completion's body or stream."""
        params, config = self._settings(body)
        n, top = requested_choices(body), requested_logprobs(body, chat)
        model_id = self._model_id(body.model)
        explicit = body.max_completion_tokens is not None or body.max_tokens is not None
        budget = limits.fit_context(max(len(p) for p in prompts), params.max_tokens, explicit,
                                    await self.node.context_length(model_id), "messages" if chat else "prompt")
        await self.node.check_draft(model_id, config)
        limits.check_vocabulary(prompts, len(self.node.tokenizer))
        completion = Completion(self.node, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                                body.model or self.node.default_model, model_id, chat, prompts,
                                msgspec.structs.replace(params, max_tokens=budget), config, n, top, body.stops(),
                                body.stream, bool(body.stream_options and body.stream_options.include_usage))
        if not body.stream:
            return await completion.respond(request, self.disconnect_poll_s)
        # Admitted before the 200 goes out; the slot is held for the whole stream.
        return AdmittedResponse(completion.admitted, ProducedStream(completion.events, media_type="text/event-stream"),
                                refusal)


def _check_contents(messages: list[Message]) -> None:
    """Every message but an assistant's must have content, as OpenAI requires (an assistant
    turn may have none: OpenAI allows it beside tool calls)."""
    for i, message in enumerate(messages):
        if message.content is None and message.role != "assistant":
            raise APIError(400, f"Missing required parameter: 'messages[{i}].content'.", f"messages[{i}].content",
                           "missing_required_parameter")


def _encoded(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each completions prompt (text is tokenized; ids are kept as sent)."""
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]

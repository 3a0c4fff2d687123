"""ChatGPT-compatible API on port 52415, plus speculative metrics and an event stream.

Every failure a client can cause is a 4xx with an OpenAI-style error body; a client that
disconnects cancels its generation (which frees its KV caches); requests never share a
cache because each has its own request id all the way down.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exo.api import limits, prometheus
from exo.api.access import AccessGuard
from exo.api.admitted import AdmittedResponse
from exo.api.choices import Choice, ChoiceError, choice_params, requested_choices, requested_logprobs, summed_usage
from exo.api.limits import Limits, Refused
from exo.api.produced import ProducedStream
from exo.api.logprobs import TokenText, chat_logprobs, completion_logprobs
from exo.api.schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, Message, Usage
from exo.api.unsupported import unrecognized_argument, unsupported_parameter
from exo.inference.cache_table import CacheTableFull
from exo.inference.text_stream import TextStream
from exo.inference.generate import GenerationParams
from exo.inference.engine import ContextLengthError
from exo.inference.logprobs import TokenLogprob
from exo.inference.sources import ModelSourceError, ModelStore
from exo.models import UnknownModelError
from exo.orchestration.admission import AdmissionRejected
from exo.orchestration.node import ModelNotOnDisk, Node
from exo.orchestration.ring_stage import RingError
from exo.speculative.config import AUTO, ConfigError

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorResponse(ErrorBody(message, kind, param, code))
        self.headers = headers


def _cluster_error(exc: RingError) -> APIError:
    """A failed stage or peer: the request cannot be served now; the cluster may heal."""
    return APIError(503, f"cluster: {exc}", None, "ring_failed", "server_error")


def _rejected(exc: AdmissionRejected) -> APIError:
    """Not admitted (queue full, or no slot in time): 429, and when to come back."""
    return APIError(429, str(exc), None, exc.reason, "rate_limit_error", {"Retry-After": str(exc.retry_after_s)})


def _json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(value), status_code=status, media_type="application/json", headers=headers)


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
        ], exception_handlers={APIError: self._api_error, 404: self._not_found, 405: self._not_allowed,
                               Exception: self._internal_error})
        self.app.add_exception_handler(Refused, self._refused)
        self.app.add_middleware(AccessGuard, api_key=api_key, allowed_hosts=allowed_hosts)

    # -- errors ------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: APIError) -> Response:
        return _json_response(exc.body, exc.status, exc.headers)

    async def _refused(self, request: Request, exc: Refused) -> Response:
        return _json_response(ErrorResponse(ErrorBody(exc.message, exc.kind, exc.param, exc.code)), exc.status)

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
        return _json_response({"node_id": self.node.id, "engines": engines, "totals": engine.get_metrics(),
                               "batching": batching,
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
        self._check_sizes(body, chat)
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

    def _check_sizes(self, body: Any, chat: bool) -> None:
        """How many messages, prompts (times n) and stop strings: each multiplies later work."""
        limits.check_stops(body.stops())
        try:
            n = requested_choices(body)
        except ChoiceError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        if chat:
            limits.check_messages(len(body.messages), self.limits.max_messages)
            return
        # A list of token ids is one prompt; a mixed list is refused later (counted as a list here).
        listed = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
        limits.check_prompts(len(body.prompt) if listed else 1, n, self.limits.max_prompts)

    def _model_id(self, name: str | None, param: str = "model") -> str:
        """The node's model for a client's name (404, the same for any unknown name)."""
        try:
            return self.node.models.resolve(name or self.node.default_model)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param, "model_not_found") from exc

    async def _tokenizer(self, model: str | None):
        model_id = self._model_id(model)
        try:
            await self.node.shard_for(model_id)
        except ModelNotOnDisk as exc:
            raise APIError(404, str(exc), "model", "model_not_on_disk") from exc
        except UnknownModelError as exc:
            raise APIError(404, str(exc), "model", "model_not_found") from exc
        except ModelSourceError as exc:
            raise APIError(503, f"model unavailable: {exc}", "model", "model_unavailable", "server_error") from exc
        except RingError as exc:
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
            overrides = body.speculative.fields() if body.speculative else {}
            if overrides.get("draft_model", AUTO) != AUTO:
                overrides["draft_model"] = self._model_id(overrides["draft_model"], "speculative.draft_model")
            config = self.node.config.merged(overrides) if overrides else self.node.config
            if config.enabled:
                from exo.speculative.config import choose_draft
                choose_draft(self._model_id(body.model), config.draft_model)
        except ConfigError as exc:
            raise APIError(400, str(exc), "speculative") from exc
        return params, config

    async def _respond(self, request: Request, body: Any, prompts: list[list[int]],
                       chat: bool) -> Response | AdmittedResponse:
        params, config = self._settings(body)
        try:
            n, top = requested_choices(body), requested_logprobs(body, chat)
        except ChoiceError as exc:
            raise APIError(400, str(exc), exc.param) from exc
        model_id = self._model_id(body.model)
        explicit = body.max_completion_tokens is not None or body.max_tokens is not None
        budget = limits.fit_context(max(len(p) for p in prompts), params.max_tokens, explicit,
                                    await self.node.context_length(model_id), "messages" if chat else "prompt")
        params = msgspec.structs.replace(params, max_tokens=budget)
        try:
            await self.node.check_draft(model_id, config)
        except ConfigError as exc:
            raise APIError(400, str(exc), "speculative") from exc
        except AdmissionRejected as exc:  # its draft could not be swapped in while others use another
            raise _rejected(exc) from exc
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.model or self.node.default_model
        tokenizer = self.node.tokenizer
        for prompt in prompts:
            if prompt and (min(prompt) < 0 or max(prompt) >= len(tokenizer)):
                raise APIError(400, f"prompt holds token ids outside the vocabulary (0..{len(tokenizer) - 1})",
                               "prompt")
        # Choice i*n + j is prompt i's j-th generation; choice 0 keeps the response's id.
        choices = [Choice(i * n + j, request_id if i * n + j == 0 else f"{request_id}-{i * n + j}", prompt,
                          choice_params(params, j, top), TextStream(tokenizer, body.stops(), tokenizer.eos_token_ids))
                   for i, prompt in enumerate(prompts) for j in range(n)]
        token_text = TokenText(tokenizer)
        created = int(time.time())

        async def deltas(choice: Choice, emit: Callable[[str, TokenLogprob | None, int], Awaitable[None]]) -> None:
            """Generate `choice`, emitting (text delta, log-prob entry if asked, its text offset)
            per token, until the budget, end of sequence or a stop string. A coroutine with a
            callback rather than a generator: the node's tasks live inside this call."""
            text = choice.text
            try:
                async with self.node.generate(model_id, choice.prompt, choice.params, config, choice.request_id,
                                              slot=request_id if body.stream else None) as blocks:
                    async for block in blocks:
                        for i, token in enumerate(block.tokens):
                            entry, offset = None, choice.decoded
                            if top is not None and token not in tokenizer.eos_token_ids:
                                entry = block.logprobs[i]  # end of text shows no token
                            choice.count += 1
                            delta = text.push(token)
                            if entry is not None:
                                choice.reported.append(entry)
                                choice.offsets.append(offset)
                                if not chat:
                                    choice.decoded = len(tokenizer.decode(text.ids))
                            await emit(delta, entry, offset)
                            if text.stopped:  # the rest of the block is never sent: not generated for anyone
                                self.node.counters.unsent(len(block.tokens) - i - 1)
                                return
            except ConfigError as exc:
                raise APIError(400, str(exc), "speculative") from exc
            except ContextLengthError as exc:
                raise APIError(400, str(exc), "max_tokens", "context_length_exceeded") from exc
            except RingError as exc:
                raise _cluster_error(exc) from exc
            except AdmissionRejected as exc:  # by the draft node this request was forwarded to
                raise _rejected(exc) from exc
            except CacheTableFull as exc:
                raise APIError(503, str(exc), None, "cache_full", "server_error") from exc

        def finish_reason(choice: Choice) -> str:
            if choice.text.stopped:
                return "stop"
            outcome = self.node.outcome(choice.request_id)
            return (outcome.finish_reason if outcome else None) or "stop"

        def usage() -> Usage:
            outcomes = [self.node.outcome(c.request_id) for c in choices] if config.enabled else []
            return summed_usage(prompts, sum(c.count for c in choices),
                                [o.metrics for o in outcomes if o is not None and o.metrics is not None])

        def render(entries: list[TokenLogprob], offsets: list[int]) -> dict | None:
            if top is None:
                return None
            return chat_logprobs(entries, token_text) if chat else completion_logprobs(entries, offsets, token_text)

        if body.stream:  # admitted before the 200 goes out; the slot is held for the whole stream
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = partial(self._sse, request_id, model, created, chat, choices, deltas, finish_reason,
                          usage if include_usage else None, render)
            stream = ProducedStream(sse, media_type="text/event-stream")
            return AdmittedResponse(lambda: self.node.admit(request_id), stream,
                                    lambda exc: self._refusal(_rejected(exc)))
        error = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._cancel_on_disconnect, request, group.cancel_scope)

            async def collect(choice: Choice) -> None:
                """One choice under its own admission slot (choices of one request queue like others)."""
                nonlocal error
                async def keep(delta: str, entry: TokenLogprob | None, offset: int) -> None:
                    choice.pieces.append(delta)

                try:
                    async with self.node.admit(choice.request_id):
                        await deltas(choice, keep)
                    choice.pieces.append(choice.text.flush())
                except AdmissionRejected as exc:
                    error = error or _rejected(exc)
                    group.cancel_scope.cancel()
                except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                    error = error or exc
                    group.cancel_scope.cancel()

            async with anyio.create_task_group() as work:
                for choice in choices:
                    work.start_soon(collect, choice)
            group.cancel_scope.cancel()
        if error is not None:
            raise error
        if await request.is_disconnected():
            return Response(status_code=499)
        rendered = []
        for choice in choices:
            content = "".join(choice.pieces)
            item = ({"index": choice.index, "message": {"role": "assistant", "content": content}} if chat
                    else {"index": choice.index, "text": content})
            item["logprobs"] = render(choice.reported, choice.offsets)
            item["finish_reason"] = finish_reason(choice)
            rendered.append(item)
        return _json_response({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                              "created": created, "model": model, "choices": rendered, "usage": usage()})

    def _refusal(self, error: APIError) -> Response:
        return _json_response(error.body, error.status, error.headers)

    async def _cancel_on_disconnect(self, request: Request, scope: anyio.CancelScope) -> None:
        while not await request.is_disconnected():
            await anyio.sleep(self.disconnect_poll_s)
        log.info("client disconnected; cancelling its generation")
        scope.cancel()

    async def _sse(self, request_id: str, model: str, created: int, chat: bool, choices: list[Choice],
                   deltas: Callable[[Choice, Callable[[str, TokenLogprob | None, int], Awaitable[None]]],
                                    Awaitable[None]],
                   finish_reason: Callable[[Choice], str], usage: Callable[[], Usage] | None,
                   render: Callable[[list[TokenLogprob], list[int]], dict | None],
                   write: Callable[[bytes], Awaitable[None]]) -> None:
        """Per choice (one after another, each chunk naming its index): one chunk per token, then
        a final chunk (held-back text, finish_reason). With `usage` (the client's
        `stream_options.include_usage`), as OpenAI: every chunk carries `usage: null` and one
        more chunk, `choices: []`, the usage. Then [DONE]."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": request_id, "object": kind, "created": created, "model": model}

        def event(items: list[dict], **extra: Any) -> bytes:
            unset = {"usage": None} if usage is not None else {}
            return b"data: " + _json.encode({**head, "choices": items, **unset, **extra}) + b"\n\n"

        def chunk(index: int, delta: str | None, finish: str | None, logprobs: dict | None = None,
                  first: bool = False) -> bytes:
            if chat:
                payload = {"role": "assistant", "content": delta} if first else (
                    {"content": delta} if delta is not None else {})
                return event([{"index": index, "delta": payload, "logprobs": logprobs, "finish_reason": finish}])
            return event([{"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}])

        try:
            for choice in choices:
                first = True

                async def token_chunk(delta: str, entry: TokenLogprob | None, offset: int) -> None:
                    """One chunk per generated token, even while its text is held back."""
                    nonlocal first
                    logprobs = render([entry], [offset]) if entry is not None else None
                    await write(chunk(choice.index, delta, None, logprobs, first=first))
                    first = False

                await deltas(choice, token_chunk)
                await write(chunk(choice.index, choice.text.flush() or None, finish_reason(choice)))
            if usage is not None:
                await write(event([], usage=msgspec.to_builtins(usage())))
        except APIError as exc:
            await write(b"data: " + _json.encode(exc.body) + b"\n\n")
        except Exception as exc:  # the stream has started; report in-band rather than drop the connection
            log.exception("generation failed in %s", request_id)
            error = ErrorResponse(ErrorBody(f"generation failed: {exc}", "server_error"))
            await write(b"data: " + _json.encode(error) + b"\n\n")
        await write(b"data: [DONE]\n\n")


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

"""One completion request: its choices run through the node, answered as a JSON body or a stream.

A `Completion` holds what the route settled (ids, model, settings, the choices with their
prompts and parameters) and produces either the whole response (choices generated
concurrently, each under its own admission slot, cancelled when the client goes away) or the
event stream (choices one after another under the response's slot: one chunk per token, a
final chunk per choice, the usage chunk when asked, then [DONE]).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractAsyncContextManager
from typing import Any, Awaitable, Callable

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from exo.api.choices import Choice, choice_params, summed_usage
from exo.api.errors import api_error, internal_error, json_response
from exo.api.logprobs import TokenText, chat_logprobs, completion_logprobs
from exo.api.schemas import Usage
from exo.inference.generate import GenerationParams
from exo.inference.logprobs import TokenLogprob
from exo.inference.text_stream import TextStream
from exo.orchestration.node import Node
from exo.speculative.config import SpeculativeConfig

log = logging.getLogger("exo.api")
_json = msgspec.json.Encoder()
Emit = Callable[[str, TokenLogprob | None, int], Awaitable[None]]  # (text delta, log-prob entry, text offset)


class Completion:
    def __init__(self, node: Node, request_id: str, model: str, model_id: str, chat: bool,
                 prompts: list[list[int]], params: GenerationParams, config: SpeculativeConfig, n: int,
                 top: int | None, stops: list[str], stream: bool, include_usage: bool):
        """`model` is the client's name for `model_id`; `n` generations per prompt; `top`: how
        many log-prob alternatives per token (None: none asked)."""
        self.node, self.request_id, self.model, self.model_id, self.chat = node, request_id, model, model_id, chat
        self.prompts, self.config, self.top, self.stream = prompts, config, top, stream
        self.include_usage = include_usage
        self.created = int(time.time())
        tokenizer = node.tokenizer
        self.tokenizer, self.token_text = tokenizer, TokenText(tokenizer)
        # Choice i*n + j is prompt i's j-th generation; choice 0 keeps the response's id.
        self.choices = [Choice(i * n + j, request_id if i * n + j == 0 else f"{request_id}-{i * n + j}", prompt,
                               choice_params(params, j, top), TextStream(tokenizer, stops, tokenizer.eos_token_ids))
                        for i, prompt in enumerate(prompts) for j in range(n)]

    # -- one choice --------------------------------------------------------------------------
    async def generate(self, choice: Choice, emit: Emit) -> None:
        """Generate `choice`, emitting each token's text delta (held back near a stop string),
        its log-prob entry if asked and its text offset, until the budget, the end of sequence
        or a stop string. A coroutine with a callback rather than a generator: the node's
        tasks live inside this call."""
        text, eos = choice.text, self.tokenizer.eos_token_ids
        slot = self.request_id if self.stream else None  # a stream's choices share the response's slot
        async with self.node.generate(self.model_id, choice.prompt, choice.params, self.config, choice.request_id,
                                      slot=slot) as blocks:
            async for block in blocks:
                for i, token in enumerate(block.tokens):
                    entry, offset = None, choice.decoded
                    if self.top is not None and token not in eos:
                        entry = block.logprobs[i]  # end of text shows no token
                    choice.count += 1
                    delta = text.push(token)
                    if entry is not None:
                        choice.reported.append(entry)
                        choice.offsets.append(offset)
                        if not self.chat:
                            choice.decoded = len(self.tokenizer.decode(text.ids))
                    await emit(delta, entry, offset)
                    if text.stopped:  # the rest of the block is never sent: not generated for anyone
                        self.node.counters.unsent(len(block.tokens) - i - 1)
                        return

    def finish_reason(self, choice: Choice) -> str:
        if choice.text.stopped:
            return "stop"
        outcome = self.node.outcome(choice.request_id)
        return (outcome.finish_reason if outcome else None) or "stop"

    def usage(self) -> Usage:
        outcomes = [self.node.outcome(c.request_id) for c in self.choices] if self.config.enabled else []
        return summed_usage(self.prompts, sum(c.count for c in self.choices),
                            [o.metrics for o in outcomes if o is not None and o.metrics is not None])

    def logprobs(self, entries: list[TokenLogprob], offsets: list[int]) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(entries, offsets, self.token_text)

    # -- the whole response ------------------------------------------------------------------
    async def respond(self, request: Request, poll_s: float) -> Response:
        """Every choice at once, each under its own admission slot (choices queue like other
        requests); the first error ends them all and is raised; a client gone yields 499."""
        errors: list[Exception] = []
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, request, group.cancel_scope, poll_s)
            async with anyio.create_task_group() as work:
                for choice in self.choices:
                    work.start_soon(self._collect, choice, errors, group.cancel_scope)
            group.cancel_scope.cancel()
        if errors:
            raise errors[0]
        if await request.is_disconnected():
            return Response(status_code=499)
        return json_response({"id": self.request_id, "object": "chat.completion" if self.chat else "text_completion",
                              "created": self.created, "model": self.model,
                              "choices": [self._rendered(c) for c in self.choices], "usage": self.usage()})

    async def _collect(self, choice: Choice, errors: list[Exception], scope: anyio.CancelScope) -> None:
        async def keep(delta: str, entry: TokenLogprob | None, offset: int) -> None:
            choice.pieces.append(delta)

        try:
            async with self.node.admit(choice.request_id):
                await self.generate(choice, keep)
            choice.pieces.append(choice.text.flush())
        except Exception as exc:  # raised by `respond`, outside the task group (no ExceptionGroup)
            errors.append(exc)
            scope.cancel()

    def _rendered(self, choice: Choice) -> dict:
        content = "".join(choice.pieces)
        item = ({"index": choice.index, "message": {"role": "assistant", "content": content}} if self.chat
                else {"index": choice.index, "text": content})
        item["logprobs"] = self.logprobs(choice.reported, choice.offsets)
        item["finish_reason"] = self.finish_reason(choice)
        return item

    # -- the event stream --------------------------------------------------------------------
    def admitted(self) -> AbstractAsyncContextManager:
        """The response's admission slot, held for the whole stream."""
        return self.node.admit(self.request_id)

    async def events(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Per choice (one after another, each chunk naming its index): one chunk per token,
        then a final chunk (held-back text, finish_reason). With `include_usage`, as OpenAI:
        every chunk carries `usage: null` and one more chunk, `choices: []`, the usage. An
        error after the stream started is reported in-band. Then [DONE]."""
        try:
            for choice in self.choices:
                await self._stream_choice(choice, write)
            if self.include_usage:
                await write(self._event([], usage=msgspec.to_builtins(self.usage())))
        except Exception as exc:  # the status line is out: report in-band rather than drop the connection
            error = api_error(exc)
            if error is None:
                log.exception("generation failed in %s", self.request_id)
                error = internal_error(exc, "generation failed")
            await write(error.event())
        await write(b"data: [DONE]\n\n")

    async def _stream_choice(self, choice: Choice, write: Callable[[bytes], Awaitable[None]]) -> None:
        first = True

        async def token_chunk(delta: str, entry: TokenLogprob | None, offset: int) -> None:
            """One chunk per generated token, even while its text is held back."""
            nonlocal first
            logprobs = self.logprobs([entry], [offset]) if entry is not None else None
            await write(self._chunk(choice.index, delta, None, logprobs, first))
            first = False

        await self.generate(choice, token_chunk)
        await write(self._chunk(choice.index, choice.text.flush() or None, self.finish_reason(choice)))

    def _chunk(self, index: int, delta: str | None, finish: str | None, logprobs: dict | None = None,
               first: bool = False) -> bytes:
        if not self.chat:
            return self._event([{"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}])
        payload = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta is not None
                                                                          else {})
        return self._event([{"index": index, "delta": payload, "logprobs": logprobs, "finish_reason": finish}])

    def _event(self, items: list[dict], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        unset = {"usage": None} if self.include_usage else {}
        body = {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
                "choices": items, **unset, **extra}
        return b"data: " + _json.encode(body) + b"\n\n"


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope, poll_s: float) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(poll_s)
    log.info("client disconnected; cancelling its generation")
    scope.cancel()

"""What a request may ask of the node, checked before any work is done.

Every check here runs before a model is loaded, a chat template rendered, a tokenizer called
or a stream started (the one exception, the rendered chat's length, before it is tokenized),
so a hostile or careless request costs the node little and gets a 4xx in the OpenAI error
shape instead of hanging, stalling every other client, crashing or being served garbage.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request

from exo.api.unsupported import MAX_CHOICES


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The node's caps on one request (operator-tunable; defaults suit a single node)."""

    max_body_bytes: int = 4 * 1024 * 1024  # 413 above
    max_json_depth: int = 32  # nesting of objects/arrays; the decoder recurses per level
    max_prompt_chars: int = 1_000_000  # never hand the chat template or the tokenizer more than this
    max_messages: int = 2048  # a chat's messages: the template renders each (long agent sessions fit)
    max_prompts: int = MAX_CHOICES  # a completions prompt list; and prompts x n <= MAX_CHOICES generations


# Characters any chat template adds per message at the least (a role name, a separator): with
# the content, a lower bound on the rendered prompt, checked before rendering it.
MESSAGE_OVERHEAD_CHARS = 4
MAX_STOPS = 4  # OpenAI's limit on `stop` strings


class Refused(Exception):
    """A request the node will not serve; rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


MAX_SEED = 2**64 - 1  # numpy's SeedSequence takes any non-negative int; a u64 is plenty
TEMPERATURE_RANGE = (0.0, 2.0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes
    (from Content-Length before reading, else while streaming it in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Refused:
    return Refused(413, f"request body too large: this node accepts at most {limit} bytes",
                   code="request_too_large")


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def check_depth(raw: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than `limit` before the (recursive) decoder sees it.

    Strings are blanked first so brackets inside them do not count; malformed JSON is left
    for the decoder to report.
    """
    structure = _STRING.sub(b"", raw)
    if not structure:
        return
    depth = np.cumsum(_OPEN[np.frombuffer(structure, dtype=np.uint8)], dtype=np.int64)
    deepest = int(depth.max()) if depth.size else 0
    if deepest > limit:
        raise Refused(400, f"request JSON is nested {deepest} levels deep; at most {limit} are allowed",
                      code="nesting_too_deep")


def check_sampling(body: Any) -> None:
    """Every numeric parameter in the range the OpenAI API accepts (400 naming it otherwise)."""
    low, high = TEMPERATURE_RANGE
    if body.temperature is not None and not low <= body.temperature <= high:
        raise _out_of_range("temperature", body.temperature, f"between {low:g} and {high:g}")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise _out_of_range("top_p", body.top_p, "greater than 0 and at most 1")
    if body.top_k is not None and body.top_k < 0:
        raise _out_of_range("top_k", body.top_k, "at least 0")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise _out_of_range("seed", body.seed, f"between 0 and {MAX_SEED}")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value < 1:
            raise _out_of_range(name, value, "at least 1")


def _out_of_range(name: str, value: Any, allowed: str) -> Refused:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return Refused(400, f"invalid {name}: {shown}; it must be {allowed}", name, "invalid_value")


def check_messages(count: int, limit: int) -> None:
    """Refuse a chat with more messages than the node renders (the template loops over each)."""
    if count > limit:
        raise Refused(400, f"the chat has {count} messages; this node accepts at most {limit}", "messages",
                      "too_many_messages")


def check_prompts(count: int, n: int, limit: int) -> None:
    """Refuse a completions prompt list over the cap, or more generations (prompts x n) than
    one response may hold: each is a full generation under the request's one admission."""
    if count > limit:
        raise Refused(400, f"the prompt list has {count} prompts; this node accepts at most {limit}", "prompt",
                      "too_many_prompts")
    if count * n > MAX_CHOICES:
        raise Refused(400, f"{count} prompts x n={n} is {count * n} generations; at most {MAX_CHOICES} are "
                      "allowed per request", "n", "too_many_choices")


def check_stops(stops: list[str]) -> None:
    """At most MAX_STOPS stop strings, as OpenAI allows (each is searched for at every token)."""
    if len(stops) > MAX_STOPS:
        raise Refused(400, f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop", "invalid_value")


def chat_chars(contents: list[str]) -> int:
    """A lower bound on the rendered chat's length: its content plus each message's overhead."""
    return sum(len(c) for c in contents) + MESSAGE_OVERHEAD_CHARS * len(contents)


def check_prompt_chars(chars: int, limit: int, param: str) -> None:
    """Refuse a prompt too long to be worth tokenizing (the tokenizer allocates per character)."""
    if chars > limit:
        raise Refused(400, f"the prompt is {chars} characters long; this node tokenizes at most {limit}. "
                      "Please reduce the length of the prompt.", param, "context_length_exceeded")


def fit_context(prompt_tokens: int, max_tokens: int, explicit: bool, context: int | None, param: str) -> int:
    """The token budget a request gets within the model's `context` window.

    A budget the client set must fit with the prompt (else 400, the OpenAI message); the
    node's default budget is shortened to what is left, as long as one token is.
    """
    if context is None:
        return max_tokens
    room = context - prompt_tokens
    if explicit and max_tokens > room or room < 1:
        asked = prompt_tokens + (max_tokens if explicit else 1)
        raise Refused(400, f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{asked} tokens ({prompt_tokens} in the messages, {asked - prompt_tokens} in the "
                      "completion). Please reduce the length of the messages or completion.",
                      param, "context_length_exceeded")
    return min(max_tokens, room)


def check_vocabulary(prompts: list[list[int]], vocabulary: int) -> None:
    """Refuse token ids the model has no embedding for (a client's list of ids)."""
    for prompt in prompts:
        if prompt and (min(prompt) < 0 or max(prompt) >= vocabulary):
            raise Refused(400, f"prompt holds token ids outside the vocabulary (0..{vocabulary - 1})", "prompt")

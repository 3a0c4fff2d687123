"""Request and response bodies of the OpenAI-compatible API, as msgspec Structs."""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str = ""


class Message(msgspec.Struct, forbid_unknown_fields=False):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's `stream_options` (only with `stream: true`)."""

    include_usage: bool | None = None  # one extra chunk, `choices: []`, carrying the usage
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


class _Sampling(msgspec.Struct, forbid_unknown_fields=False):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Any subset of SpeculativeConfig's fields, under their own names: merged into the node's
    # config and checked by it (SpeculativeConfig.merged), so the API restates none of them.
    speculative: dict[str, Any] | None = None
    n: int | None = None  # choices, each its own generation

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = []
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20 alternatives per token; needs logprobs


class CompletionRequest(_Sampling):
    # A string, a list of strings (one choice each), a list of token ids, or a list of those.
    prompt: Union[str, list[Union[str, int, list[int]]]] = ""
    logprobs: int | None = None  # 0..5 alternatives per token (OpenAI's legacy shape)

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per choice group: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        if any(isinstance(p, int) for p in self.prompt):
            raise ValueError("prompt mixes token ids with strings or lists")
        return list(self.prompt)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: dict | None = None  # drafted, accepted, acceptance_rate, mean_accepted_length


class ErrorBody(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody

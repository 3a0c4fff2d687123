"""Request parameters this node does not implement: refused by name instead of ignored.

A client that asks for JSON mode, tools, penalties, logit bias, echo, images or audio and
silently gets something else has been lied to; a 400 naming the parameter tells it. A
parameter no OpenAI endpoint knows (a typo: `max_token`, `temprature`) is refused as OpenAI
refuses it, "Unrecognized request argument supplied".
"""

from __future__ import annotations

from typing import Any

MAX_CHOICES = 8  # n: each choice is a full generation

# Every top-level field of OpenAI's request bodies, plus this node's own (`speculative`,
# `top_k`; `max_completion_tokens` on completions too). Known fields this node does not
# implement are refused by `unsupported_parameter` below; the rest it honours or, where they
# change nothing about the text (user, metadata, store, service_tier, prompt_cache_key, ...),
# accepts and ignores.
_NODE_PARAMETERS = frozenset({"speculative", "top_k"})
_SHARED_PARAMETERS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
    "user", "presence_penalty", "frequency_penalty", "logit_bias", "max_completion_tokens",
})
CHAT_PARAMETERS = _SHARED_PARAMETERS | _NODE_PARAMETERS | frozenset({
    "messages", "top_logprobs", "metadata", "store", "service_tier", "parallel_tool_calls", "response_format",
    "tools", "tool_choice", "functions", "function_call", "modalities", "audio", "prediction", "reasoning_effort",
    "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
})
COMPLETION_PARAMETERS = _SHARED_PARAMETERS | _NODE_PARAMETERS | frozenset({"prompt", "echo", "suffix", "best_of"})


def unrecognized_argument(body: Any, chat: bool) -> str | None:
    """The first top-level field of the raw JSON body that the endpoint does not know, else None."""
    if not isinstance(body, dict):
        return None
    known = CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS
    return next((name for name in body if name not in known), None)


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {} and value != ""


def unsupported_parameter(body: Any, chat: bool) -> tuple[str, str] | None:
    """(param, message) for the first unsupported parameter in the raw JSON body, else None."""
    if not isinstance(body, dict):
        return None
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        return "response_format", f"response_format {kind!r} is not supported (only {{\"type\": \"text\"}})"
    for name in ("tools", "functions"):
        if _set(body.get(name)):
            return name, f"{name} (function calling) is not supported"
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            return name, f"{name} (function calling) is not supported"
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and value != 0:
            return name, f"{name} other than 0 is not supported"
    if _set(body.get("logit_bias")):
        return "logit_bias", "logit_bias is not supported"
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        return "modalities", "modalities other than [\"text\"] are not supported"
    if _set(body.get("audio")):
        return "audio", "audio output is not supported"
    if _set(body.get("web_search_options")):
        return "web_search_options", "web_search_options (web search) is not supported"
    if not chat:
        if _set(body.get("echo")):
            return "echo", "echo is not supported"
        if _set(body.get("suffix")):
            return "suffix", "suffix (insertion) is not supported"
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            return "best_of", "best_of other than 1 is not supported"
    for i, message in enumerate(body.get("messages") or [] if chat else []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    return f"messages[{i}].content[{j}]", f"content parts of type {kind!r} are not supported (text only)"
        if isinstance(message, dict) and _set(message.get("tool_calls")):
            return f"messages[{i}].tool_calls", "tool calls are not supported"
    return None

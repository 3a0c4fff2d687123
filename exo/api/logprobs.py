"""OpenAI's two logprobs shapes, rendered from the target's per-token entries.

Chat: `choices[].logprobs.content[{token, logprob, bytes, top_logprobs[...]}]`; completions:
`choices[].logprobs{tokens, token_logprobs, top_logprobs, text_offset}`. Token strings are
the token's own bytes (byte-level BPE vocabularies map back exactly), so a token holding
half a UTF-8 character still reports its real bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from exo.inference.logprobs import TokenLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table (byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """Token id -> (text, bytes) for one tokenizer, cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            raw = self._raw_bytes(token)
            if raw is None:
                text = self.tokenizer.decode([token])
                raw = text.encode("utf-8")
            self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token]

    def _raw_bytes(self, token: int) -> bytes | None:
        convert = getattr(self.tokenizer.hf, "convert_ids_to_tokens", None)
        piece = convert(token) if convert is not None else None
        if not isinstance(piece, str):
            return None
        table = _byte_decoder()
        if not all(ch in table for ch in piece):
            return None  # not a byte-level vocabulary (or a special token outside it)
        return bytes(table[ch] for ch in piece)


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict:
    """`choices[].logprobs` of a chat completion (or one stream chunk)."""

    def item(token: int, logprob: float) -> dict:
        string, raw = text(token)
        return {"token": string, "logprob": logprob, "bytes": raw}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], offsets: list[int], text: TokenText) -> dict:
    """`choices[].logprobs` of a (legacy) completion; `offsets` are each token's character
    offset into the completion text."""
    def alternatives(entry: TokenLogprob) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, logprob in entry.top:  # tokens that render alike keep the likeliest's value
            out.setdefault(text(token)[0], logprob)
        return out

    return {"tokens": [text(e.token)[0] for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [alternatives(e) for e in entries],
            "text_offset": list(offsets)}

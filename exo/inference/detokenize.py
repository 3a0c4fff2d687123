"""Incremental detokenization that never prints half a UTF-8 character."""

from __future__ import annotations

from typing import Any


class StreamingDetokenizer:
    def __init__(self, tokenizer: Any, skip_ids: frozenset[int] = frozenset()):
        self.tokenizer, self.skip_ids = tokenizer, skip_ids
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, tokens: list[int]) -> str:
        """The new text these tokens complete (may be empty while a character is partial)."""
        self.ids.extend(t for t in tokens if t not in self.skip_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)

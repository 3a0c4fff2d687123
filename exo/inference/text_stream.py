"""Token ids to text deltas, one per token, honouring stop strings.

Text that could still turn out to be the start of a stop string is held back until it is
decided, so a streamed response never shows a stop string or anything after it.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stops: list[str], skip_ids: frozenset[int]):
        self.tokenizer, self.stops, self.skip_ids = tokenizer, [s for s in stops if s], skip_ids
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """The text this token makes final (may be ''); sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        if token not in self.skip_ids:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # half a character; wait for the rest
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.stopped = True
                delta = text[self.sent:at]
                self.sent = at
                return delta
        safe = len(text)
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    safe = min(safe, len(text) - n)
                    break
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Whatever was held back, once generation ended without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[self.sent:], len(text)
        return delta

"""A subset of the vocabulary for a draft model's output head (FR-Spec-style).

A small draft model spends a large share of each step on its output head: Qwen2.5 0.5B's
151,936-row head is over a quarter of its weights. Drafts are almost always frequent tokens,
so a draft can score only those. Byte-level BPE vocabularies (GPT-2, Qwen, Llama 3, SmolLM2)
number their tokens in merge order, and a BPE merge is learned in order of pair frequency,
so the lowest ids are the most frequent tokens: the subset is the first `first` ids plus the
special tokens (end of turn, end of text), ranked without any corpus.

It stays lossless: the draft samples from the restricted distribution, and the verifier is
given exactly that distribution (zero outside the subset).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np


class HeadRows(msgspec.Struct, frozen=True):
    """The rows a last shard computes logits for, in this order: ids `0..first-1`, then `extra`."""

    first: int
    extra: tuple[int, ...] = ()

    @classmethod
    def ranked(cls, size: int, vocab_size: int, always: list[int] | tuple[int, ...] = ()) -> "HeadRows":
        """The `size` lowest ids of a `vocab_size` vocabulary, plus each of `always` above them."""
        if size < 1:
            raise ValueError(f"a head subset needs at least one row, got {size}")
        first = min(size, vocab_size)
        extra = tuple(sorted({int(t) for t in always if first <= int(t) < vocab_size}))
        return cls(first, extra)

    @classmethod
    def of(cls, value: Any) -> "HeadRows":
        """Accept the struct itself or its decoded form (it crosses the process engine's pipe)."""
        return value if isinstance(value, HeadRows) else msgspec.convert(value, HeadRows)

    @property
    def size(self) -> int:
        return self.first + len(self.extra)

    def ids(self) -> np.ndarray:
        """Token id of each output row."""
        return np.concatenate([np.arange(self.first, dtype=np.int64), np.asarray(self.extra, dtype=np.int64)])

    def select(self, logits: np.ndarray) -> np.ndarray:
        """These rows of full-vocabulary `logits` (..., V): what a backend without its own
        restricted head returns (same result, no saving)."""
        if not self.extra:
            return logits[..., :self.first]
        return np.concatenate([logits[..., :self.first], logits[..., list(self.extra)]], axis=-1)

    def token(self, row: int) -> int:
        """The token id of output row `row`."""
        return row if row < self.first else self.extra[row - self.first]

    def widen(self, probs: np.ndarray) -> np.ndarray:
        """A distribution over the rows as one over ids `0..max id` (zero elsewhere; the
        verifier pads it to the target's vocabulary)."""
        width = max(self.first, self.extra[-1] + 1 if self.extra else 0)
        full = np.zeros(probs.shape[:-1] + (width,), dtype=probs.dtype)
        full[..., :self.first] = probs[..., :self.first]
        if self.extra:
            full[..., list(self.extra)] = probs[..., self.first:]
        return full

"""Log-probabilities of emitted tokens under the target's own distribution.

OpenAI reports the model's distribution before any sampling transform, so these are the
log-softmax of the raw logits (no temperature, top-k or top-p), at the position each token
was emitted from. Only requests that ask for them pay for them.
"""

from __future__ import annotations

import msgspec
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per position


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One emitted token: its log-probability and the `top` most likely (id, log-prob) pairs."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = []


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-softmax over the last axis (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def token_logprobs(raw: np.ndarray, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Entries for `tokens[i]` emitted from raw logits row `raw[i]`, each with `top_n` alternatives
    (most likely first; ties by lower id, the order greedy decoding breaks them in)."""
    rows = log_softmax(np.asarray(raw)[: len(tokens)])
    out = []
    for row, token in zip(rows, tokens):
        # An id past this model's (padded) vocabulary has probability zero under it.
        logprob = float(row[token]) if token < row.shape[-1] else float("-inf")
        top: list[tuple[int, float]] = []
        if top_n > 0:
            n = min(top_n, row.shape[-1])
            head = np.argpartition(-row, n - 1)[:n] if n < row.shape[-1] else np.arange(row.shape[-1])
            order = head[np.lexsort((head, -row[head]))]
            top = [(int(i), float(row[i])) for i in order]
        out.append(TokenLogprob(int(token), logprob, top))
    return out

"""Token sampling in pure numpy, shared by plain and speculative decoding.

`warp` turns logits into the exact distribution a token is drawn from. Greedy decoding is
`temperature == 0`, which warps to a one-hot argmax, so greedy and sampled decoding run
through the same code (and the same rejection sampler, later).
"""

from __future__ import annotations

import numpy as np

# Top-p only needs the head of the distribution; sort this many candidates first and fall
# back to a full sort when they do not reach the requested mass.
_TOP_P_CANDIDATES = 2048


def warp(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities (float64, same shape) after temperature, top-k and top-p, over the last axis.

    Ties at the top-k boundary keep every tied token; temperature 0 is the one-hot argmax
    with ties broken by the lowest id.
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    z = np.asarray(logits, dtype=np.float64)
    vocab = z.shape[-1]
    if temperature == 0:
        probs = np.zeros_like(z)
        np.put_along_axis(probs, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return probs
    z = z / temperature
    if 0 < top_k < vocab:
        kth = np.partition(z, vocab - top_k, axis=-1)[..., vocab - top_k : vocab - top_k + 1]
        z = np.where(z >= kth, z, -np.inf)
    z = z - np.max(z, axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return probs


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest most-probable set whose mass reaches `top_p` (ties: lower id first)."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = np.zeros_like(flat)
    for row, p in zip(out, flat):
        head = min(_TOP_P_CANDIDATES, p.size)
        candidates = np.argpartition(-p, head - 1)[:head] if head < p.size else np.arange(p.size)
        if p[candidates].sum() < top_p:
            candidates = np.arange(p.size)
        # Sort by probability descending, then id ascending, so ties are deterministic.
        order = candidates[np.lexsort((candidates, -p[candidates]))]
        mass_before = np.cumsum(p[order]) - p[order]
        keep = order[mass_before < top_p]
        row[keep] = p[keep]
        row /= row.sum()
    return out.reshape(probs.shape)


def judge_rng(seed: int | None) -> np.random.Generator:
    """The stream that decides a request's tokens (plain sampling, acceptance, residuals).

    It and `draft_rng` are independent children of one `SeedSequence`: a draft drawn with
    the numbers that judge it would be biased, and wherever the judging runs (this process
    or the last stage of a ring) it must read the same stream for a seed to mean one text.
    """
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])


def draft_rng(seed: int | None) -> np.random.Generator:
    """The stream a drafter samples its proposals from (see `judge_rng`)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])


class BlockDraftRngs:
    """A pipelined drafter's streams: one per (epoch, block start), all children of the
    request's draft stream (see `judge_rng`).

    A pipelined drafter drafts blocks it later drops, as timing decides; with one stream per
    block what it draws for the blocks that count does not depend on that, so a seed means one
    text there too. No block start recurs within an epoch, so no numbers are reused after a
    rejection (reused, they would be conditioned on the verdict that rejected them: biased).
    """

    def __init__(self, seed: int | None):
        self._entropy = np.random.SeedSequence(seed).entropy

    def __call__(self, epoch: int, start: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self._entropy, spawn_key=(1, epoch, start)))


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id from a 1-D distribution (need not be normalised); zero-mass ids never come out."""
    cumulative = np.cumsum(probs, dtype=np.float64)
    total = cumulative[-1]
    if not total > 0:
        raise ValueError("cannot sample from an all-zero distribution")
    return int(np.searchsorted(cumulative, rng.random() * total, side="right"))


def sample_last(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """Sample from the last position of `logits` (..., V)."""
    last = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1]
    if temperature == 0:
        return int(np.argmax(last))
    return sample(warp(last, temperature, top_k, top_p), rng or np.random.default_rng())

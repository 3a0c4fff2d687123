"""Warping and rejection sampling for speculative decoding, in pure numpy.

`warp` is the one definition of "the distribution a token is drawn from" (shared with
plain decoding); `verify_block` is the lossless acceptance rule of Leviathan et al. 2023
(Algorithm 1) and Chen et al. 2023. Neither knows anything about models.
"""

from __future__ import annotations

import numpy as np

from exo.inference.sampling import sample, warp

__all__ = ["warp", "verify_block", "sample"]


def verify_block(target_probs: np.ndarray, draft_probs: np.ndarray, draft_tokens: np.ndarray,
                 rng: np.random.Generator) -> list[int]:
    """Emitted tokens (1..K+1): the accepted drafts, then a residual or bonus sample.

    `target_probs` (K+1, V) and `draft_probs` (K, V) must be warped the same way; draft
    token i must have been drawn from `draft_probs[i]`. Draft i is kept with probability
    min(1, p_i(d_i) / q_i(d_i)); the first rejection emits a sample of norm(max(0, p_i - q_i))
    and stops; if all K pass, a bonus token comes from p_{K+1}. At temperature 0 (one-hot
    rows) this is "keep while the target's argmax agrees, then emit the target's argmax".
    """
    draft_tokens = np.asarray(draft_tokens, dtype=np.int64).reshape(-1)
    k = draft_tokens.size
    if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k:
        raise ValueError(f"shapes disagree: target {target_probs.shape}, draft {draft_probs.shape}, K={k}")
    emitted: list[int] = []
    for i, token in enumerate(draft_tokens.tolist()):
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        # q == 0 cannot happen for a token drawn from q; rejecting it keeps the output exact anyway.
        if q > 0 and rng.random() * q < p:
            emitted.append(token)
            continue
        residual = np.maximum(target_probs[i] - draft_probs[i], 0.0)
        # An all-zero residual means p == q up to rounding, where rejection has probability ~0.
        emitted.append(sample(residual if residual.sum() > 0 else target_probs[i], rng))
        return emitted
    emitted.append(sample(target_probs[k], rng))
    return emitted

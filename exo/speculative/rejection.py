"""The acceptance rule of speculative decoding, in pure numpy.

`verify_block` is the lossless rule of Leviathan et al. 2023 (Algorithm 1) and Chen et al.
2023 for drafts drawn from a distribution q, and its special case for deterministic drafts
(q is the point mass on the drafted token): keep it with probability p(x), else sample p
with x removed. It knows nothing about models; `warp` and `sample` come from
`exo.inference.sampling`, shared with plain decoding.
"""

from __future__ import annotations

import numpy as np

from exo.inference.sampling import sample


def verify_block(target_probs: np.ndarray, draft_probs: np.ndarray | None, draft_tokens: np.ndarray,
                 rng: np.random.Generator) -> list[int]:
    """Emitted tokens (1..K+1): the accepted drafts, then a correction or bonus sample.

    `target_probs` (K+1, V) and `draft_probs` (K, V) must be warped the same way; draft
    token i must have been drawn from `draft_probs[i]`, or chosen deterministically when
    `draft_probs` is None. Draft i is kept with probability min(1, p_i(d_i) / q_i(d_i));
    the first rejection emits a sample of norm(max(0, p_i - q_i)) and stops; if all K pass,
    a bonus token comes from p_{K+1}. For a deterministic draft q_i is the point mass on
    d_i, so d_i is kept with probability p_i(d_i) and the correction is p_i without d_i.
    At temperature 0 (one-hot rows) both read "keep while the target's argmax agrees, then
    emit the target's argmax".
    """
    draft_tokens = np.asarray(draft_tokens, dtype=np.int64).reshape(-1)
    k = draft_tokens.size
    if target_probs.shape[0] != k + 1 or (draft_probs is not None and draft_probs.shape[0] != k):
        shape = None if draft_probs is None else draft_probs.shape
        raise ValueError(f"shapes disagree: target {target_probs.shape}, draft {shape}, K={k}")
    emitted: list[int] = []
    for i, token in enumerate(draft_tokens.tolist()):
        correction = _correction(target_probs[i], None if draft_probs is None else draft_probs[i], token, rng)
        if correction is not None:
            emitted.append(correction)
            return emitted
        emitted.append(token)
    emitted.append(sample(target_probs[k], rng))
    return emitted


def _correction(p: np.ndarray, q: np.ndarray | None, token: int, rng: np.random.Generator) -> int | None:
    """None if `token` is kept, else the token emitted in its place (`q` None: a deterministic draft)."""
    q_token = 1.0 if q is None else float(q[token])
    # q == 0 cannot happen for a token drawn from q; rejecting it keeps the output exact anyway.
    if q_token > 0 and rng.random() * q_token < float(p[token]):
        return None
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    # An all-zero residual means p == q up to rounding, where rejection has probability ~0.
    return sample(residual if residual.sum() > 0 else p, rng)

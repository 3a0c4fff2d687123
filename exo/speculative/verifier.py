"""The target side: verify a draft block in one forward pass and roll back the rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exo.inference.engine import InferenceEngine, last_only
from exo.inference.generate import GenerationParams
from exo.inference.sampling import sample
from exo.inference.shard import Shard
from exo.speculative.kv import KVRollbackError, rollback_to
from exo.speculative.proposer import DraftBlock
from exo.speculative.sampling import verify_block, warp


@dataclass(frozen=True)
class Verdict:
    emitted: list[int]  # tokens now committed, in order
    accepted: int  # how many of them are the block's draft tokens
    drafted: int  # block size
    kept: int  # tokens in the target's KV cache after rollback

    @property
    def diverged(self) -> bool:
        """True if a token the drafter did not propose was committed (residual or bonus)."""
        return len(self.emitted) > self.accepted


class TargetVerifier:
    """Verifies one request's blocks; holds that request's deferred target row, if any.

    With `defer_bonus`, a fully accepted block commits only its drafts and keeps the
    target's distribution for the next position; the next block's first draft is checked
    against it. A pipelined drafter is already drafting from exactly that position, so its
    in-flight block stays valid (PEARL's post-verify), and nothing is lost: every position
    is still decided by the same rejection rule.
    """

    def __init__(self, engine: InferenceEngine, shard: Shard, request_id: str, params: GenerationParams):
        self.engine, self.shard, self.request_id, self.params = engine, shard, request_id, params
        self.pending: np.ndarray | None = None  # warped target row for the next position

    async def prefill(self, prompt: list[int], rng: np.random.Generator) -> int:
        """Process the prompt and sample the first token (no draft can help here)."""
        logits, _ = await self.engine.infer_tensor(self.request_id, self.shard, np.asarray([prompt]), last_only())
        return sample(self._warp(logits[0, -1:])[0], rng)

    async def verify(self, committed: list[int], block: DraftBlock, rng: np.random.Generator,
                     defer_bonus: bool = False) -> Verdict:
        """Commit 1..K+1 tokens for `block`; the cache then holds `committed` + accepted drafts."""
        expected = len(committed) if self.pending is not None else len(committed) - 1
        held = self.engine.cache_offset(self.request_id)
        if held != expected:
            raise KVRollbackError(f"target cache of {self.request_id!r} holds {held} tokens, expected {expected}")
        if self.pending is not None and not block.tokens:
            token, self.pending = sample(self.pending, rng), None
            return Verdict([token], 0, 0, len(committed))
        inputs = block.tokens if self.pending is not None else [committed[-1], *block.tokens]
        logits, _ = await self.engine.infer_tensor(self.request_id, self.shard, np.asarray([inputs]),
                                                   last_only(len(inputs)))
        rows = self._warp(logits[0])
        if self.pending is not None:
            rows = np.concatenate([self.pending[None], rows])
        emitted = _verify(rows, block, rng)
        accepted = len(emitted) - 1  # a residual sample never equals the rejected draft
        self.pending = None
        if defer_bonus and accepted == block.k and block.k:
            emitted, self.pending = emitted[:-1], rows[-1]
        rollback_to(self.engine, self.request_id, len(committed) + accepted)
        return Verdict(emitted, accepted, block.k, len(committed) + accepted)

    def _warp(self, rows: np.ndarray) -> np.ndarray:
        return warp(rows, self.params.temperature, self.params.top_k, self.params.top_p)


def _verify(target: np.ndarray, block: DraftBlock, rng: np.random.Generator) -> list[int]:
    # Vocabularies may be padded to different sizes; ids past a model's vocabulary have
    # probability zero under it.
    draft = block.probs if block.k else np.zeros((0, target.shape[-1]))
    vocab = max(target.shape[-1], draft.shape[-1])
    target = np.pad(target, ((0, 0), (0, vocab - target.shape[-1])))
    draft = np.pad(draft, ((0, 0), (0, vocab - draft.shape[-1])))
    return verify_block(target, draft, np.asarray(block.tokens, dtype=np.int64), rng)

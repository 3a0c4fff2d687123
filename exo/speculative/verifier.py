"""The target side: verify a draft block in one forward pass and roll back the rest."""

from __future__ import annotations

import numpy as np

from exo.inference.engine import InferenceEngine, last_only
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.speculative.kv import KVRollbackError, rollback_to
from exo.speculative.proposer import DraftBlock
from exo.speculative.sampling import verify_block, warp


class TargetVerifier:
    def __init__(self, engine: InferenceEngine, shard: Shard):
        self.engine, self.shard = engine, shard

    async def prefill(self, request_id: str, prompt: list[int], params: GenerationParams,
                      rng: np.random.Generator) -> int:
        """Process the prompt and sample the first token (no draft can help here)."""
        logits, _ = await self.engine.infer_tensor(request_id, self.shard, np.asarray([prompt]), last_only())
        empty = DraftBlock([], np.zeros((0, logits.shape[-1])), len(prompt))
        return self._emit(logits, empty, params, rng)[0]

    async def verify(self, request_id: str, committed: list[int], block: DraftBlock,
                     params: GenerationParams, rng: np.random.Generator) -> list[int]:
        """Emitted tokens for `block`; afterwards the target cache holds `committed` + accepted drafts."""
        base = len(committed) - 1
        if self.engine.cache_offset(request_id) != base:
            raise KVRollbackError(
                f"target cache of {request_id!r} holds {self.engine.cache_offset(request_id)} tokens, expected {base}"
            )
        inputs = [committed[-1], *block.tokens]
        logits, _ = await self.engine.infer_tensor(request_id, self.shard, np.asarray([inputs]),
                                                   last_only(len(inputs)))
        emitted = self._emit(logits, block, params, rng)
        rollback_to(self.engine, request_id, base + len(emitted))
        return emitted

    @staticmethod
    def _emit(logits: np.ndarray, block: DraftBlock, params: GenerationParams,
              rng: np.random.Generator) -> list[int]:
        rows = logits.reshape(-1, logits.shape[-1])[-(block.k + 1):]
        target = warp(rows, params.temperature, params.top_k, params.top_p)
        draft = block.probs
        # Vocabularies may be padded to different sizes; ids past a model's vocabulary have
        # probability zero under it.
        vocab = max(target.shape[-1], draft.shape[-1])
        target = np.pad(target, ((0, 0), (0, vocab - target.shape[-1])))
        draft = np.pad(draft, ((0, 0), (0, vocab - draft.shape[-1])))
        return verify_block(target, draft, np.asarray(block.tokens, dtype=np.int64), rng)

"""A draft model: propose up to K tokens with the probabilities they were drawn from."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from exo.inference.engine import HEAD_ROWS, InferenceEngine, last_only
from exo.inference.generate import GenerationParams
from exo.inference.head_rows import HeadRows
from exo.inference.sampling import sample, warp
from exo.inference.shard import Shard
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.config import SpeculativeConfig
from exo.speculative.drafters.base import DraftBlock, OneRequest
from exo.speculative.drafters.head import draft_head_rows
from exo.speculative.kv import rollback_to

# More unseen tokens than this (after copies, or a deferred prompt pass) get a pass of their
# own; a step after a normal verdict sees one or two, and splitting those would cost a pass.
CATCH_UP_AFTER = 8


class ModelDrafter:
    """A `Proposer` backed by a small model on `engine`; its KV cache (the engine's, under the
    request's id) is the state of the one request it serves.

    With `head_rows` the draft scores only those vocabulary rows (a cheaper step); its blocks
    carry the restricted distribution it sampled from, so verification stays exact.
    """

    def __init__(self, engine: InferenceEngine, shard: Shard, head_rows: HeadRows | None = None):
        self.engine, self.shard, self.head_rows = engine, shard, head_rows
        self._state = last_only() | ({HEAD_ROWS: head_rows} if head_rows is not None else {})
        self._request = OneRequest("model drafter")

    async def _step(self, request_id: str, tokens: list[int]) -> np.ndarray:
        """One draft forward over `tokens`; the logits row of its last position."""
        logits, _ = await self.engine.infer_tensor(request_id, self.shard, np.asarray([tokens]), self._state)
        return logits.reshape(-1, logits.shape[-1])[-1]

    async def prefill(self, request_id: str, prompt: list[int]) -> None:
        """Run the draft over the prompt once, before any block: a block's draft time must be
        its draft steps only, or adaptive K would price every token at the prompt's cost."""
        self._request.bind(request_id)
        if self.engine.cache_offset(request_id) != 0:
            raise RuntimeError(f"draft cache of {request_id!r} is not empty before its prefill")
        await self._step(request_id, prompt)

    async def propose(self, request_id: str, committed: list[int], k: int, params: GenerationParams,
                      threshold: float, rng: np.random.Generator,
                      interrupted: Callable[[], bool] = lambda: False, trusted: int = 0) -> DraftBlock:
        """Draft up to `k` tokens after `committed`.

        Stops early once the draft's own top probability drops below `threshold` (a guess
        it is likely to lose) at a position past the first `trusted` ones (where the draft
        has recently been accepted at least that often anyway), or when `interrupted()`
        says a verdict may have made the block moot.
        """
        self._request.bind(request_id)  # a hybrid defers the prefill: this may be the first call
        held = self.engine.cache_offset(request_id)
        pending = committed[held:]  # tokens this draft has not seen yet (>= 1)
        if not pending:
            raise RuntimeError(f"draft cache of {request_id!r} is ahead of the committed sequence")
        caught_up, caught_up_tokens = 0.0, 0
        if len(pending) > CATCH_UP_AFTER:  # one pass over what it missed, timed apart from the steps
            started = time.perf_counter()
            await self._step(request_id, pending[:-1])
            caught_up, caught_up_tokens = time.perf_counter() - started, len(pending) - 1
            pending = pending[-1:]
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        step_input = pending
        steps = 0
        for i in range(k):
            if i and interrupted():
                break
            row = await self._step(request_id, step_input)
            steps += 1
            if threshold > 0 and i >= max(trusted, 1) and _top_probability(row) < threshold:
                # The cache now holds the last drafted token too; keep the invariant that the
                # final token of a block is unseen by the draft, so the next call has input.
                rollback_to(self.engine, request_id, self.engine.cache_offset(request_id) - 1)
                break
            token, probs = self._draw(row, params, rng)
            tokens.append(token)
            rows.append(probs)
            step_input = [token]
        vocab = rows[0].shape[-1] if rows else 0
        return DraftBlock(tokens, np.stack(rows) if rows else np.zeros((0, vocab)), len(committed), steps=steps,
                          catch_up_seconds=caught_up, catch_up_tokens=caught_up_tokens)

    def _draw(self, row: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """A token from a step's logits row, and the distribution (over token ids) it came from."""
        probs = warp(row, params.temperature, params.top_k, params.top_p)
        index = int(np.argmax(probs)) if params.temperature == 0 else sample(probs, rng)
        if self.head_rows is None:
            return index, probs
        return self.head_rows.token(index), self.head_rows.widen(probs)

    def lag(self, request_id: str, committed_length: int) -> int:
        """Committed tokens the next block would first take in with a catch-up pass (0: none)."""
        self._request.bind(request_id)
        pending = committed_length - self.engine.cache_offset(request_id)
        return pending - 1 if pending > CATCH_UP_AFTER else 0

    def limit(self, chosen_k: int) -> int:
        return chosen_k  # every token costs a draft step: adaptive K's choice is the limit

    def verified(self, request_id: str, block: DraftBlock, accepted: int, committed_length: int) -> None:
        """Nothing to learn here: adaptive K learns the model's acceptance."""
        self._request.bind(request_id)

    def accept(self, request_id: str, committed_length: int) -> None:
        """Forget drafted tokens past the now-committed prefix."""
        self._request.bind(request_id)
        held = self.engine.cache_offset(request_id)
        rollback_to(self.engine, request_id, min(held, committed_length))

    def release(self, request_id: str) -> None:
        self._request.check(request_id)
        self.engine.free_cache(request_id)


def build_model(config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                controller: AdaptiveK | None = None) -> ModelDrafter:
    """The "model" drafter for one request (see `registry`): the draft model alone, through the
    restricted head `config.draft_vocab` asks for. `controller` is unused: adaptive K drives
    a model draft from outside."""
    if engine is None or shard is None:
        raise ValueError("the model drafter needs a draft model")
    return ModelDrafter(engine, shard, draft_head_rows(config, engine))


def _top_probability(logits: np.ndarray) -> float:
    return float(1.0 / np.exp(logits - logits.max()).sum())

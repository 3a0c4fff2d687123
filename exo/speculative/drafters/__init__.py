"""Drafters: what proposes the tokens the target verifies.

Schedulers, the speculative engine and the verifiers depend only on `Proposer` and
`DraftBlock`; each drafter is one module here, chosen by `make_proposer` from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from exo.inference.engine import InferenceEngine
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.speculative.config import SpeculativeConfig


@dataclass
class DraftBlock:
    tokens: list[int]
    # (len(tokens), V), warped exactly like the target's rows: row i is the distribution
    # token i was drawn from. None: the tokens were chosen deterministically.
    probs: np.ndarray | None
    base_length: int  # length of the sequence the block extends
    epoch: int = 0  # pipelined: which run of speculation since the last divergence
    draft_seconds: float = 0.0
    steps: int = 0  # draft forwards run for this block (one more than k after a confidence cut)

    @property
    def k(self) -> int:
        return len(self.tokens)


class Proposer(Protocol):
    """Proposes blocks after a request's committed sequence and keeps per-request state in step with it."""

    async def prefill(self, request_id: str, prompt: list[int]) -> None:
        """Take in the prompt once, before any block (timed apart from the blocks)."""

    async def propose(self, request_id: str, committed: list[int], k: int, params: GenerationParams,
                      threshold: float, rng: np.random.Generator,
                      interrupted: Callable[[], bool] = lambda: False, trusted: int = 0) -> DraftBlock:
        """Up to `k` tokens after `committed`, which extends what was proposed or accepted
        before. `threshold` and `trusted` may cut the block short where the drafter is
        unsure; `interrupted()` true means a verdict may have made the block moot."""

    def accept(self, request_id: str, committed_length: int) -> None:
        """The first `committed_length` tokens are committed: forget proposals past them."""

    def release(self, request_id: str) -> None:
        """The request is over: free what is held for it (idempotent)."""


def make_proposer(config: SpeculativeConfig, engine: InferenceEngine, shard: Shard) -> Proposer:
    """The drafter `config` asks for, drafting with the draft `engine` holding `shard`."""
    # Imported here: drafter modules import this package for `DraftBlock`.
    if config.drafter == "model":
        from exo.speculative.drafters.model import ModelDrafter

        return ModelDrafter(engine, shard)
    raise ValueError(f"unknown drafter {config.drafter!r}")

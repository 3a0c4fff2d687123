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
from exo.inference.head_rows import HeadRows
from exo.inference.shard import Shard
from exo.speculative.adaptive import AdaptiveK
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
    drafter: str = "model"  # which drafter proposed it (metrics, and what adaptive K learns from)
    # Of draft_seconds, the part spent catching the draft up on committed tokens it had not
    # seen (after copies, or a deferred prompt pass): real time, but not a draft step's cost.
    catch_up_seconds: float = 0.0
    catch_up_tokens: int = 0

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

    def limit(self, chosen_k: int) -> int:
        """The most tokens the next block may hold when adaptive K chose `chosen_k` (the
        model draft's best length; a free drafter may go beyond it)."""

    def accept(self, request_id: str, committed_length: int) -> None:
        """The first `committed_length` tokens are committed: forget proposals past them."""

    def verified(self, request_id: str, block: DraftBlock, accepted: int, committed_length: int) -> None:
        """`block` was judged (`accepted` of its tokens kept) and the first `committed_length`
        tokens are final. Unlike `accept`, this never rolls back: in a pipelined run blocks
        after this one may still be in flight."""

    def release(self, request_id: str) -> None:
        """The request is over: free what is held for it (idempotent)."""


def draft_head_rows(config: SpeculativeConfig, engine: InferenceEngine) -> HeadRows | None:
    """The restricted output head `config.draft_vocab` asks for on the loaded draft, or None."""
    if not config.draft_vocab or engine.tokenizer is None:
        return None
    tokenizer = engine.tokenizer
    # Added tokens (end of turn, tool and FIM markers) sit past the merges: always keep them.
    added = list(tokenizer.hf.added_tokens_decoder)
    return HeadRows.ranked(config.draft_vocab, len(tokenizer), [*tokenizer.eos_token_ids, *added])


def make_proposer(config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                  controller: AdaptiveK) -> Proposer:
    """The drafter `config.drafter` names ("auto" resolved by the caller), drafting with the
    draft `engine` holding `shard` where it needs a model; `controller` is the request's."""
    # Imported here: drafter modules import this package for `DraftBlock`.
    from exo.speculative.drafters.suffix import SuffixDrafter

    def suffix() -> SuffixDrafter:
        return SuffixDrafter(min_match=config.suffix_min_match, max_depth=config.suffix_max_depth)

    from exo.speculative.drafters.hybrid import HybridDrafter
    from exo.speculative.drafters.model import ModelDrafter

    if config.drafter == "suffix":  # copies alone, under the hybrid's policy of when they pay
        return HybridDrafter(None, suffix(), controller)
    if engine is None or shard is None:
        raise ValueError(f"the {config.drafter!r} drafter needs a draft model")
    model = ModelDrafter(engine, shard, draft_head_rows(config, engine))
    if config.drafter == "model":
        return model
    if config.drafter == "hybrid":
        return HybridDrafter(model, suffix(), controller)
    raise ValueError(f"unknown drafter {config.drafter!r}")

"""What every drafter shares: the block it proposes, the `Proposer` protocol, and the guard
that keeps a proposer to the one request it serves.

Schedulers, the speculative engine and the verifiers depend on these alone, never on a
drafter module; so this module imports nothing of the project at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import numpy as np

    from exo.inference.generate import GenerationParams


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
    """Proposes blocks after a request's committed sequence and keeps its state in step with it.

    A proposer serves exactly one request: `make_proposer` builds one per request, and all it
    holds (a draft cache position, a suffix index, learned copy acceptance) is that request's.
    The `request_id` arguments stay because the draft engine keys its KV cache by them; the
    first one a proposer is given binds it (see `OneRequest`), and any other raises.
    """

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


class OneRequest:
    """The request a proposer serves: the first id it is given. Another id means two requests
    share the proposer and would mix their state, a caller's bug, so it raises."""

    __slots__ = ("owner", "request_id")

    def __init__(self, owner: str):
        self.owner = owner  # named in the error
        self.request_id: str | None = None

    def bind(self, request_id: str) -> None:
        """`request_id` is the proposer's request (the first call decides which that is)."""
        if self.request_id is None:
            self.request_id = request_id
        self.check(request_id)

    def check(self, request_id: str) -> None:
        """Like `bind` but binds nothing (for `release`: a proposer that served no request
        holds nothing to free)."""
        if self.request_id is not None and request_id != self.request_id:
            raise RuntimeError(f"{self.owner} serves request {self.request_id!r}, not {request_id!r}: "
                               f"a proposer is bound to one request")

"""Hybrid drafting: for each block, a copy from the suffix drafter, a guess from the draft
model, or no draft, whichever is expected to give the most tokens per second. Without a
model it is the suffix drafter's policy alone: copy, and how much, only where it pays.

The model's side comes from adaptive K (its per-position acceptance and measured step and
verify costs). The copy's side is learned here, per match length: every block, whoever
drafted it, the suffix drafter's candidate is scored against the tokens that were then
committed. For a deterministic draft token x the target accepts with probability p(x),
which is exactly the chance the committed token equals x, so that score is an unbiased
sample of the copy's acceptance whether or not the copy was verified. A copy costs only
its verify (the drafting takes microseconds), so its best length is the prefix with the
most expected tokens per verify second.

When copies were used, the draft model's cache lags the committed sequence; the model
drafter catches it up in one pass over the missing tokens, the next time it drafts. Its
prompt pass is deferred the same way: the first blocks copy where they can, and a request
whose copies beat even an untried model's prior never pays for the draft's prompt pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from exo.inference.engine import InferenceEngine
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.speculative.adaptive import PRIOR_DRAFT_SIZE, AdaptiveK, DecayedRate
from exo.speculative.config import SpeculativeConfig
from exo.speculative.drafters.base import DraftBlock, OneRequest
from exo.speculative.drafters.model import ModelDrafter, build_model
from exo.speculative.drafters.suffix import SuffixDrafter

RESUMED = -1  # the bucket of copies resumed past a replaced token (see SuffixDrafter)


def prior_copy_acceptance(bucket: int) -> float:
    """Before any evidence: a copy after a match of L tokens is kept with L / (L + 2) per
    token (0.5 at L = 2, 0.8 at 8, 0.94 at 32): a long repeat tends to go on; a resumed copy
    with 0.5. It weighs two observations, so the first few scored candidates decide."""
    return 0.5 if bucket == RESUMED else bucket / (bucket + 2)

PENDING_CANDIDATES = 8  # unscored candidates kept at most (a pipelined run has a few in flight)
# Tokens over which a catch-up pass (the draft's deferred prompt pass, or what it missed
# while copies were used) is paid back: the request's remaining budget, but no more than
# this, since most answers end well before a large max_tokens.
CATCH_UP_HORIZON = 256


def match_bucket(match_length: int) -> int:
    """Matches of similar length share an estimate: 2, 3, then powers of two up to 32."""
    if match_length < 4:
        return match_length
    bucket = 4
    while bucket * 2 <= min(match_length, 32):
        bucket *= 2
    return bucket


@dataclass
class _Candidate:
    base: int  # committed length the copy extends
    tokens: list[int]
    bucket: int


class HybridDrafter:
    """A `Proposer` choosing per block between a `SuffixDrafter` and a `ModelDrafter`
    (None: copies or nothing).

    Like every proposer it serves one request, and so do its drafters and `controller` (the
    request's adaptive K): what it learns and tracks (copy acceptance per match length, the
    copies still to score, the final and prompt lengths) is that request's alone.
    """

    def __init__(self, model: ModelDrafter | None, suffix: SuffixDrafter, controller: AdaptiveK):
        self.model, self.suffix, self.controller = model, suffix, controller
        self._serves = OneRequest("hybrid drafter")
        self.copy_acceptance: dict[int, DecayedRate] = {}
        self._pending: list[_Candidate] = []
        self._final = 0  # committed length known to be final
        self._prompt_length = 0

    async def prefill(self, request_id: str, prompt: list[int]) -> None:
        self._serves.bind(request_id)
        await self.suffix.prefill(request_id, prompt)  # the model's prompt pass waits for its first block
        self._final = self._prompt_length = len(prompt)

    def limit(self, chosen_k: int) -> int:
        return max(self._model_limit(chosen_k), self.suffix.limit(chosen_k))

    def _model_limit(self, chosen_k: int) -> int:
        return self.model.limit(chosen_k) if self.model is not None else 0

    async def propose(self, request_id: str, committed: list[int], k: int, params: GenerationParams,
                      threshold: float, rng: np.random.Generator,
                      interrupted: Callable[[], bool] = lambda: False, trusted: int = 0) -> DraftBlock:
        self._serves.bind(request_id)
        self._score(committed)
        copy = self.suffix.draft(request_id, committed, min(k, self.suffix.max_depth))
        bucket = (RESUMED if self.suffix.last_resumed(request_id)
                  else match_bucket(self.suffix.last_match(request_id)))
        if copy.tokens:
            self._pending = [c for c in self._pending if c.base != len(committed)][-PENDING_CANDIDATES + 1:]
            self._pending.append(_Candidate(len(committed), list(copy.tokens), bucket))
            if self.controller.adaptive:
                copy.tokens = copy.tokens[:self._best_copy_length(bucket, len(copy.tokens))]
        model_k = min(k, self._model_limit(self.controller.choose()))
        if self.controller.adaptive:
            left = params.max_tokens - (len(committed) - self._prompt_length)
            lag = self.model.lag(request_id, len(committed)) if model_k else 0
            choice = self._choose(copy, bucket, model_k, lag, left)
        else:  # a fixed K decides by the text alone, never by timings, so a seed reproduces the output
            choice = "suffix" if copy.tokens else "model" if model_k else "none"
        if choice == "suffix":
            return copy
        if choice == "model" and self.model is not None:
            return await self.model.propose(request_id, committed, model_k, params, threshold, rng,
                                            interrupted, trusted)
        return DraftBlock([], None, len(committed), drafter="none")

    def verified(self, request_id: str, block: DraftBlock, accepted: int, committed_length: int) -> None:
        self._serves.bind(request_id)
        self.suffix.verified(request_id, block, accepted, committed_length)
        if self.model is not None:
            self.model.verified(request_id, block, accepted, committed_length)
        self._final = max(self._final, committed_length)

    def accept(self, request_id: str, committed_length: int) -> None:
        self._serves.bind(request_id)
        self.suffix.accept(request_id, committed_length)
        if self.model is not None:
            self.model.accept(request_id, committed_length)
        self._final = max(self._final, committed_length)
        # Candidates drafted after rejected tokens were copies for a sequence that never was.
        self._pending = [c for c in self._pending if c.base <= committed_length]

    def release(self, request_id: str) -> None:
        self._serves.check(request_id)
        self.suffix.release(request_id)
        if self.model is not None:
            self.model.release(request_id)

    # -- choosing ---------------------------------------------------------------------------
    def _rate(self, bucket: int) -> DecayedRate:
        return self.copy_acceptance.setdefault(bucket, DecayedRate(prior_copy_acceptance(bucket)))

    def _copy_tokens(self, bucket: int, n: int) -> float:
        """Expected tokens per verify of an n-token copy: the verify's own one plus a^1..a^n."""
        a = self._rate(bucket).value
        return 1.0 + sum(a ** i for i in range(1, n + 1))

    def _best_copy_length(self, bucket: int, n: int) -> int:
        """The prefix of a copy with the most expected tokens per second of verify (all of it
        until verify costs are measured)."""
        costs = [self.controller.verify_cost(m + 1) for m in range(1, n + 1)]
        if any(c is None for c in costs):
            return n
        return max(range(1, n + 1), key=lambda m: (self._copy_tokens(bucket, m) / costs[m - 1], -m))

    def _choose(self, copy: DraftBlock, bucket: int, model_k: int, lag: int = 0, left: int = 1) -> str:
        """"suffix", "model" or "none" by expected tokens per second (a copy whenever there is
        one while costs are still unmeasured: it costs nothing to try). A model whose cache
        lags by `lag` tokens must first catch up; that pass is spread over the `left` tokens
        still to come (at most CATCH_UP_HORIZON), so a long prompt with a short answer, or
        a short gap between copies, does not pay for the model draft unless it earns it back."""
        rates: dict[str, float | None] = {"none": self.controller.expected_rate(0)}
        if copy.tokens:
            verify = self.controller.verify_cost(copy.k + 1)
            rates["suffix"] = self._copy_tokens(bucket, copy.k) / verify if verify else None
        if model_k:
            rate = self.controller.expected_rate(model_k) or self._untried_model_rate(model_k)
            catch_up = self.controller.catch_up_cost(lag) if lag else 0.0
            if rate is not None and catch_up:
                horizon = max(1, min(left, CATCH_UP_HORIZON))
                rate = horizon / (catch_up + horizon / rate)
            rates["model"] = rate
        if copy.tokens and rates["suffix"] is None:
            return "suffix"
        known = {name: rate for name, rate in rates.items() if rate is not None}
        if not known:
            return "model" if model_k else "none"
        return max(known, key=lambda name: known[name])

    def _untried_model_rate(self, k: int) -> float | None:
        """What an unmeasured model draft is worth: adaptive K's acceptance prior, a draft step
        at PRIOR_DRAFT_SIZE of a target step. Copies that keep missing fall below it, so the
        model gets its first block; from then on its own measured costs count."""
        plain, verify = self.controller.verify_cost(1), self.controller.verify_cost(k + 1)
        if plain is None or verify is None:
            return None
        tau, survive = 1.0, 1.0
        for i in range(k):
            survive *= self.controller.acceptance_at(i)
            tau += survive
        return tau / (k * PRIOR_DRAFT_SIZE * plain + verify)

    # -- learning ---------------------------------------------------------------------------
    def _score(self, committed: list[int]) -> None:
        """Score every candidate whose fate the final tokens now decide (see the module doc)."""
        final = min(self._final, len(committed))
        still: list[_Candidate] = []
        for candidate in self._pending:
            span = committed[candidate.base:final]
            kept = 0
            while kept < min(len(span), len(candidate.tokens)) and span[kept] == candidate.tokens[kept]:
                kept += 1
            if kept < len(candidate.tokens) and kept == len(span):
                still.append(candidate)  # undecided yet: the final tokens end inside the match
                continue
            rate = self._rate(candidate.bucket)
            for i in range(min(len(candidate.tokens), kept + 1)):
                rate.update(i < kept)
        self._pending = still


def build_hybrid(config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                 controller: AdaptiveK) -> HybridDrafter:
    """The "hybrid" drafter for one request (see `registry`): copies or the draft model, per block."""
    return HybridDrafter(build_model(config, engine, shard), SuffixDrafter.from_config(config), controller)


def build_suffix(config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                 controller: AdaptiveK) -> HybridDrafter:
    """The "suffix" drafter for one request: copies alone, under the hybrid's policy of when
    (and how much of) a copy pays; no model, so `engine` and `shard` are unused."""
    return HybridDrafter(None, SuffixDrafter.from_config(config), controller)

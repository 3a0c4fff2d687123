"""The target side: verify a draft block in one forward pass and roll back the rest.

`BlockJudge` is the decision (rejection rule, deferred bonus row) and needs only the
target's logits, so it can run wherever the target's last layers are: in this process
(`TargetVerifier`) or on the last node of a ring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from exo.inference.engine import PASS, InferenceEngine, last_only
from exo.inference.generate import GenerationParams
from exo.inference.logprobs import TokenLogprob, token_logprobs
from exo.inference.sampling import sample, warp
from exo.inference.shard import Shard
from exo.speculative.drafters import DraftBlock
from exo.speculative.kv import KVRollbackError, rollback_to
from exo.speculative.rejection import verify_block


@dataclass(frozen=True)
class Verdict:
    emitted: list[int]  # tokens now committed, in order
    accepted: int  # how many of them are the block's draft tokens
    drafted: int  # block size
    kept: int  # tokens in the target's KV cache after rollback
    deferred: bool = False  # the target row for the next position is held back (see BlockJudge)
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, when the request asked
    pass_positions: int | None = None  # input positions of the whole (batched) pass; None: its own

    @property
    def diverged(self) -> bool:
        """True if a token the drafter did not propose was committed (residual or bonus)."""
        return len(self.emitted) > self.accepted


def block_inputs(committed: list[int], tokens: list[int], pending: bool) -> list[int]:
    """The target's input for a block: the last committed token unless its row is already held."""
    return list(tokens) if pending else [committed[-1], *tokens]


def expected_cache(n_committed: int, pending: bool) -> int:
    """Tokens the target's cache must hold before a block: all but the last committed one,
    which the block feeds, or all of them when the next row is already held."""
    return n_committed if pending else n_committed - 1


class BlockJudge:
    """One request's rejection decisions, plus its deferred target row, if any.

    With `defer_bonus`, a fully accepted block commits only its drafts and keeps the
    target's distribution for the next position; the next block's first draft is checked
    against it. A pipelined drafter is already drafting from exactly that position, so its
    in-flight block stays valid (PEARL's post-verify), and nothing is lost: every position
    is still decided by the same rejection rule.

    With `params.logprobs` set, every verdict also reports each emitted token's log-prob
    from the raw row it was decided on (so speculation reports exactly what plain decoding
    does); the raw row is then held beside the warped one.
    """

    def __init__(self, params: GenerationParams):
        self.params = params
        self.pending: np.ndarray | None = None  # warped target row for the next position
        self.pending_raw: np.ndarray | None = None  # its raw logits, kept only for logprobs

    def first_token(self, last_logits: np.ndarray, rng: np.random.Generator) -> int:
        return sample(self.warp(last_logits[None])[0], rng)

    def first(self, last_logits: np.ndarray, rng: np.random.Generator, kept: int) -> Verdict:
        """The prompt's verdict: the first token, sampled from the prompt's last row."""
        token = self.first_token(last_logits, rng)
        return Verdict([token], 0, 0, kept, logprobs=self.logprobs(last_logits[None], [token]))

    def logprobs(self, raw: np.ndarray, tokens: list[int]) -> list[TokenLogprob] | None:
        """Entries for `tokens` emitted from `raw` rows, or None when the request did not ask."""
        if self.params.logprobs is None:
            return None
        return token_logprobs(raw, tokens, self.params.logprobs)

    def judge(self, logits: np.ndarray | None, n_committed: int, tokens: list[int], probs: np.ndarray | None,
              rng: np.random.Generator, defer_bonus: bool = False) -> Verdict:
        """Decide a block from the target's logits for its inputs (None: nothing was fed,
        only the held row is sampled). `probs` are the draft's rows, None for a
        deterministic draft. `kept` is what the target cache must be trimmed to."""
        if logits is None:
            if self.pending is None or tokens:
                raise ValueError("only a held target row can be sampled without a forward pass")
            token, self.pending = sample(self.pending, rng), None
            raw, self.pending_raw = self.pending_raw, None
            return Verdict([token], 0, 0, n_committed,
                           logprobs=self.logprobs(raw[None], [token]) if raw is not None else None)
        rows = self.warp(logits)
        raw = logits
        if self.pending is not None:
            rows = np.concatenate([self.pending[None], rows])
            if self.pending_raw is not None:
                raw = np.concatenate([self.pending_raw[None], raw])
        emitted = _verify(rows, tokens, probs, rng)
        accepted = len(emitted) - 1  # a residual sample never equals the rejected draft
        self.pending = self.pending_raw = None
        deferred = defer_bonus and accepted == len(tokens) > 0
        if deferred:
            emitted, self.pending = emitted[:-1], rows[-1]
            if self.params.logprobs is not None:
                self.pending_raw = np.asarray(raw[-1])
        return Verdict(emitted, accepted, len(tokens), n_committed + accepted, deferred,
                       self.logprobs(raw, emitted))

    def warp(self, rows: np.ndarray) -> np.ndarray:
        return warp(rows, self.params.temperature, self.params.top_k, self.params.top_p)


class TargetVerifier:
    """Verifies one request's blocks on a target engine in this process."""

    stages = 1

    def __init__(self, engine: InferenceEngine, shard: Shard, request_id: str, params: GenerationParams):
        self.engine, self.shard, self.request_id = engine, shard, request_id
        self.judge = BlockJudge(params)
        self._queued: dict[int, tuple[list[int], DraftBlock, bool]] = {}  # submitted, not yet verified
        self._tickets = 0

    async def prefill(self, prompt: list[int], rng: np.random.Generator) -> Verdict:
        """Process the prompt and sample the first token (no draft can help here)."""
        logits, _ = await self.engine.infer_tensor(self.request_id, self.shard, np.asarray([prompt]), last_only())
        return self.judge.first(logits[0, -1], rng, len(prompt))

    async def verify(self, committed: list[int], block: DraftBlock, rng: np.random.Generator,
                     defer_bonus: bool = False) -> Verdict:
        """Commit 1..K+1 tokens for `block`; the cache then holds `committed` + accepted drafts."""
        pending = self.judge.pending is not None
        expected = expected_cache(len(committed), pending)
        held = self.engine.cache_offset(self.request_id)
        if held != expected:
            raise KVRollbackError(f"target cache of {self.request_id!r} holds {held} tokens, expected {expected}")
        logits, ran = None, None
        if block.tokens or not pending:
            inputs = block_inputs(committed, block.tokens, pending)
            out, state = await self.engine.infer_tensor(self.request_id, self.shard, np.asarray([inputs]),
                                                        last_only(len(inputs)))
            logits, ran = out[0], (state or {}).get(PASS)
        verdict = self.judge.judge(logits, len(committed), block.tokens, block.probs, rng, defer_bonus)
        rollback_to(self.engine, self.request_id, verdict.kept)
        if ran is not None:
            verdict = dataclasses.replace(verdict, pass_positions=ran.positions)
        return verdict

    async def submit(self, committed: list[int], block: DraftBlock, defer_bonus: bool = False) -> int:
        """Queue a block; one device verifies blocks one after the other, so a window brings
        nothing here but keeps the schedulers' code one path."""
        self._tickets += 1
        self._queued[self._tickets] = (list(committed), block, defer_bonus)
        return self._tickets

    async def verdict(self, ticket: int, rng: np.random.Generator) -> Verdict:
        committed, block, defer_bonus = self._queued.pop(ticket)
        verdict = await self.verify(committed, block, rng, defer_bonus)
        if verdict.diverged:
            self.abandon()
        return verdict

    def abandon(self) -> None:
        self._queued.clear()

    async def close(self) -> None:
        """Nothing to release beyond the engine's cache (the engine frees it)."""


class Verifier(Protocol):
    """What a scheduler needs from the target side, local or a ring of nodes.

    `verify` is one block, sent and judged. A pipelined scheduler may instead `submit` up to
    a window of blocks, each extending `committed` plus the blocks before it, and take their
    `verdict`s oldest first; a verdict that diverges abandons the rest (never judged).
    """

    stages: int  # pipeline stages the target runs on (a window deeper than that gains nothing)

    async def prefill(self, prompt: list[int], rng: np.random.Generator) -> Verdict:
        """The first token (`emitted[0]`) and, if asked, its log-prob."""

    async def verify(self, committed: list[int], block: DraftBlock, rng: np.random.Generator,
                     defer_bonus: bool = False) -> Verdict: ...

    async def submit(self, committed: list[int], block: DraftBlock, defer_bonus: bool = False) -> int: ...

    async def verdict(self, ticket: int, rng: np.random.Generator) -> Verdict: ...

    def abandon(self) -> None:
        """Forget every block submitted and not yet judged (the request ends)."""

    async def close(self) -> None: ...


def _verify(target: np.ndarray, tokens: list[int], probs: np.ndarray | None,
            rng: np.random.Generator) -> list[int]:
    # Vocabularies may be padded to different sizes; ids past a model's vocabulary have
    # probability zero under it.
    draft = probs if tokens else None
    vocab = max(target.shape[-1], draft.shape[-1] if draft is not None else 0, *(t + 1 for t in tokens))
    target = np.pad(target, ((0, 0), (0, vocab - target.shape[-1])))
    if draft is not None:
        draft = np.pad(draft, ((0, 0), (0, vocab - draft.shape[-1])))
    return verify_block(target, draft, np.asarray(tokens, dtype=np.int64), rng)

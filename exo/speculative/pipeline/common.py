"""What both schedulers share: per-request state and the end-of-generation rule."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio
import msgspec
import numpy as np

from exo.inference.generate import GenerationParams
from exo.inference.logprobs import TokenLogprob
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.config import SpeculativeConfig
from exo.speculative.events import (
    BlockVerified, DraftProposed, EventBus, KVRollback, MetricsUpdate, SpeculationFallback,
)
from exo.speculative.metrics import SpeculativeMetrics
from exo.speculative.drafters import DraftBlock, Proposer
from exo.speculative.verifier import Verdict, Verifier

log = logging.getLogger("exo.speculative")


@dataclass(frozen=True)
class Emitted:
    """One verified block as a scheduler hands it out. Log-probs and the finish reason travel
    in the item, not in shared request state, because a pipelined verifier may already be
    blocks ahead of whoever reads the stream."""
    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked
    finish_reason: str | None = None  # set on the request's last block only


@dataclass
class SpeculativeRequest:
    request_id: str
    prompt: list[int]
    params: GenerationParams
    eos_ids: frozenset[int]
    config: SpeculativeConfig  # the request's settings (the node's, with its `speculative` object merged in)
    controller: AdaptiveK
    metrics: SpeculativeMetrics = field(default_factory=SpeculativeMetrics)
    finish_reason: str | None = None
    produced: int = 0
    events: EventBus | None = None
    node_id: str = ""
    shard_label: str = ""
    blocks: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when asked
    overlap_prefill: bool = False  # run the draft's prompt pass alongside the target's
    draft_prefilled: bool = False
    draft_broken: bool = False

    async def prefill(self, verifier: Verifier, rng: np.random.Generator,
                      proposer: Proposer | None = None) -> list[int]:
        """Process the prompt and commit the first token; returns the committed sequence.

        With `overlap_prefill` the draft's prompt pass runs concurrently (it pays when draft
        and target compute on different devices or nodes); otherwise the scheduler calls
        `prefill_draft` once the first token is out, so the draft never delays it.
        """
        start = time.perf_counter()
        if proposer is not None and self.overlap_prefill:
            async with anyio.create_task_group() as group:
                group.start_soon(self.prefill_draft, proposer)
                verdict = await verifier.prefill(self.prompt, rng)
                # The target's own pass, not the group's: the draft's runs on another device.
                target_s = time.perf_counter() - start
        else:
            verdict = await verifier.prefill(self.prompt, rng)
            target_s = time.perf_counter() - start
        self.controller.observe_prompt_pass(len(self.prompt), target_s)
        first = self.finish(verdict.emitted, verdict.logprobs)
        self.metrics.prefill_time = time.perf_counter() - start
        self.metrics.prefill_emitted = len(first)
        return [*self.prompt, *first]

    async def prefill_draft(self, proposer: Proposer | None) -> Proposer | None:
        """The draft's prompt pass, once per request, timed apart from every block; returns
        the proposer to draft with, None when there is none or it failed (decode plainly)."""
        if proposer is None or self.draft_broken:
            return None
        if not self.draft_prefilled and self.finish_reason is None:
            self.draft_prefilled = True
            start = time.perf_counter()
            try:
                await proposer.prefill(self.request_id, self.prompt)
            except Exception as exc:  # noqa: BLE001 - a broken draft means plain decoding, logged
                log.exception("draft prefill failed in request %s; continuing with plain decoding",
                              self.request_id)
                self.draft_failed(f"draft prefill failed: {exc}")
                self.draft_broken = True
            self.metrics.draft_prefill_time = time.perf_counter() - start
        return None if self.draft_broken else proposer

    def draft_budget(self, k: int, produced: int, bonus: bool = True) -> int:
        """`k` capped so a fully accepted block cannot pass the token budget: K + 1 tokens
        when the block ends with a bonus token, K when the bonus is deferred (pipelined).
        `produced` counts what is committed or, for a pipelined drafter, assumed to be."""
        left = self.params.max_tokens - produced
        return max(0, min(k, left - 1 if bonus else left))

    def publish(self, event_type: type, **fields) -> None:
        if self.events is not None:
            self.events.publish(event_type(request_id=self.request_id, node_id=self.node_id,
                                           timestamp=time.time(), **fields))

    def drafted(self, block: DraftBlock) -> None:
        self.publish(DraftProposed, block=self.blocks, tokens=block.k, drafter=block.drafter)

    def draft_failed(self, reason: str) -> None:
        self.metrics.draft_failures += 1
        self.publish(SpeculationFallback, reason=reason)

    def verified(self, block: DraftBlock, verdict: Verdict, emitted: list[int], draft_s: float,
                 verify_s: float, drafting: bool, cycle_s: float | None = None) -> None:
        """Account for one verified block: controller, metrics, events.

        `emitted` is what `finish` let through of the verdict. Metrics count only that (a
        block cut by EOS or the budget counts as drafted and accepted up to the cut); the
        controller learns from the whole verdict, which says as much about the draft."""
        if block.catch_up_tokens:
            self.controller.observe_catch_up(block.catch_up_tokens, block.catch_up_seconds)
        if block.k and block.drafter != "model":
            self.controller.observe_verify(block.k + 1, verify_s, verdict.pass_positions)
        else:
            self.controller.observe(block.k, verdict.accepted, draft_s - block.catch_up_seconds, verify_s,
                                    block.steps, cycle_s, verdict.pass_positions)
        cut = len(emitted) < len(verdict.emitted)
        drafted = min(block.k, len(emitted)) if cut else block.k
        self.metrics.record_step(drafted, min(verdict.accepted, len(emitted)), len(emitted), draft_s, verify_s,
                                 block.drafter if block.k else "none")
        if not drafting and self.metrics.draft_failures:
            self.metrics.fallback_steps += 1
        self.publish(BlockVerified, block=self.blocks, drafter=block.drafter if block.k else "none", drafted=drafted,
                     accepted=min(verdict.accepted, len(emitted)), emitted=len(emitted), verify_seconds=verify_s)
        self.publish(KVRollback, shard=self.shard_label, keep_tokens=verdict.kept)
        self.blocks += 1
        if self.events is not None:
            snapshot = self.metrics.snapshot()
            self.publish(MetricsUpdate, **{k: v for k, v in msgspec.structs.asdict(snapshot).items()
                                           if k in MetricsUpdate.__struct_fields__})

    def finish(self, emitted: list[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Cut `emitted` at end-of-sequence or the token budget (setting the finish reason);
        their log-probs, if any, are cut with them and kept in `self.logprobs`."""
        for i, token in enumerate(emitted):
            if token in self.eos_ids:
                self.finish_reason = "stop"
                emitted = emitted[: i + 1]
                break
            if self.produced + i + 1 >= self.params.max_tokens:
                self.finish_reason = "length"
                emitted = emitted[: i + 1]
                break
        self.produced += len(emitted)
        if logprobs is not None:
            self.logprobs += logprobs[: len(emitted)]
        return emitted

    def emitted(self, tokens: list[int]) -> Emitted:
        """The stream item for `tokens`, the block `finish` just let through."""
        entries = self.logprobs[len(self.logprobs) - len(tokens):] if tokens else []
        return Emitted(tokens, entries, self.finish_reason)

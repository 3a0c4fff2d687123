"""What both schedulers share: per-request state and the end-of-generation rule."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from exo.inference.generate import GenerationParams
from exo.inference.logprobs import TokenLogprob
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.events import (
    BlockVerified, DraftProposed, EventBus, KVRollback, MetricsUpdate, SpeculationFallback,
)
from exo.speculative.metrics import SpeculativeMetrics
from exo.speculative.proposer import DraftBlock
from exo.speculative.verifier import Verdict, Verifier


@dataclass
class SpeculativeRequest:
    request_id: str
    prompt: list[int]
    params: GenerationParams
    eos_ids: frozenset[int]
    threshold: float
    controller: AdaptiveK
    metrics: SpeculativeMetrics = field(default_factory=SpeculativeMetrics)
    finish_reason: str | None = None
    produced: int = 0
    events: EventBus | None = None
    node_id: str = ""
    shard_label: str = ""
    blocks: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when asked

    async def prefill(self, verifier: Verifier, rng: np.random.Generator) -> list[int]:
        """Process the prompt and commit the first token; returns the committed sequence."""
        start = time.perf_counter()
        verdict = await verifier.prefill(self.prompt, rng)
        first = self.finish(verdict.emitted, verdict.logprobs)
        self.metrics.prefill_time = time.perf_counter() - start
        return [*self.prompt, *first]

    def draft_room(self, base_length: int) -> int:
        """The most tokens worth drafting after `base_length`: a block emits at most k + 1, and
        no verify may write past prompt + max_tokens (the API keeps that within the context)."""
        return max(0, len(self.prompt) + self.params.max_tokens - base_length - 1)

    def publish(self, event_type: type, **fields) -> None:
        if self.events is not None:
            self.events.publish(event_type(request_id=self.request_id, node_id=self.node_id,
                                           timestamp=time.time(), **fields))

    def drafted(self, block: DraftBlock) -> None:
        self.publish(DraftProposed, block=self.blocks, tokens=block.k)

    def draft_failed(self, reason: str) -> None:
        self.metrics.draft_failures += 1
        self.publish(SpeculationFallback, reason=reason)

    def verified(self, block: DraftBlock, verdict: Verdict, draft_s: float, verify_s: float,
                 drafting: bool) -> None:
        """Account for one verified block: controller, metrics, events."""
        self.controller.observe(block.k, verdict.accepted, draft_s, verify_s)
        self.metrics.record_step(block.k, verdict.accepted, len(verdict.emitted), draft_s, verify_s)
        if not drafting and self.metrics.draft_failures:
            self.metrics.fallback_steps += 1
        self.publish(BlockVerified, block=self.blocks, drafted=block.k, accepted=verdict.accepted,
                     emitted=len(verdict.emitted), verify_seconds=verify_s)
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

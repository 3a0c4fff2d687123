"""SpeculativeInferenceEngine: a target engine plus a draft engine behind one interface.

It is an `InferenceEngine` (calls that process tensors go to the target) with a
`generate` that emits several tokens per step, and `get_metrics()`. The draft is optional
at every moment: if it cannot be loaded or fails mid-request, decoding continues plainly
from the same state and loading is retried later with backoff.

The draft engine holds one draft model at a time and loading another clears every request's
draft cache, so a swap waits until no request uses the draft: requests for another draft
queue, first come first served (one for the loaded draft queues behind them, so none
starves), and the swap happens once the current draft's users are done (`DraftBusy` after
`draft_wait_s`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import anyio
import msgspec

from exo.inference.engine import InferenceEngine
from exo.inference.generate import GenerationParams
from exo.inference.shard import Shard
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.compat import check_tokenizers
from exo.speculative.config import AUTO, DRAFT_PAIRS, ConfigError, SpeculativeConfig, choose_draft
from exo.speculative.drafters import drafter_kind, make_proposer, resolve
from exo.speculative.events import EventBus
from exo.speculative.metrics import MetricsSnapshot, SpeculativeMetrics
from exo.speculative.pipeline.common import Emitted, SpeculativeRequest
from exo.speculative.pipeline.pipelined import pipelined_blocks
from exo.speculative.pipeline.sequential import sequential_blocks
from exo.speculative.verifier import TargetVerifier, Verifier

log = logging.getLogger("exo.speculative")
RETRY_BACKOFF_S = (5.0, 300.0)  # first retry delay, cap
DRAFT_WAIT_S = 60.0  # how long a request may wait for the draft engine to swap to its draft
KEEP_FINISHED = 256  # finished requests whose outcome and metrics stay readable (live ones always do)


class DraftBusy(Exception):
    """Another draft model stayed in use by running requests for longer than the request may wait."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SpeculativeInferenceEngine(InferenceEngine):
    def __init__(self, target: InferenceEngine, draft: InferenceEngine, config: SpeculativeConfig,
                 events: EventBus | None = None, node_id: str = "", overlap_prefill: bool = False):
        """`overlap_prefill`: run the draft's prompt pass concurrently with the target's; say
        so only when they compute on different devices (on one they just contend)."""
        self.target, self.draft, self.config = target, draft, config
        self.overlap_prefill = overlap_prefill
        self.events = events or EventBus()
        self.node_id = node_id
        self.metrics = SpeculativeMetrics()
        self.last_request: SpeculativeRequest | None = None
        # Every live request and the `keep_finished` latest finished ones: the bound counts
        # finished requests only, so a long request's entry is there when it ends however many
        # started after it.
        self.requests: dict[str, SpeculativeRequest] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.keep_finished = KEEP_FINISHED
        self._draft_shard: Shard | None = None
        self._draft_for: str | None = None
        self._draft_users = 0  # requests drafting with the loaded draft model now
        self._swaps: deque[str] = deque()  # draft ids of requests waiting for their turn, oldest first
        self._draft_changed = anyio.Event()
        self.draft_wait_s = DRAFT_WAIT_S
        self._retry_at = 0.0
        self._backoff = RETRY_BACKOFF_S[0]
        self._plain_step_time: float | None = None
        # Measured costs carry over to new requests, only between requests measured the same
        # way: same scheduler, target, draft and verifier (local or a ring).
        self._costs: dict[tuple[bool, str, str, str], AdaptiveK] = {}
        self.draft_load_failures = 0

    # -- the engine interface: tensors go to the target ------------------------------
    @property
    def shard(self) -> Shard | None:  # type: ignore[override]
        return self.target.shard

    @property
    def tokenizer(self):  # type: ignore[override]
        return self.target.tokenizer

    @property
    def model_dir_for(self):  # type: ignore[override]
        return self.target.model_dir_for

    async def ensure_shard(self, shard: Shard) -> None:
        await self.target.ensure_shard(shard)
        if self.config.enabled and wants_draft_model(self.config, shard.model_id):
            await self.ensure_draft(shard.model_id, self.config.draft_model)

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        await self.target.load_checkpoint(shard, path)

    async def infer_tensor(self, request_id, shard, input_data, inference_state=None):
        return await self.target.infer_tensor(request_id, shard, input_data, inference_state)

    def cache_offset(self, request_id: str) -> int:
        return self.target.cache_offset(request_id)

    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        self.target.trim_cache(request_id, n_tokens)

    def free_cache(self, request_id: str) -> None:
        self.target.free_cache(request_id)
        self.draft.free_cache(request_id)

    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        """Both engines hold one cache per live request, so both get the same bound."""
        self.target.set_cache_policy(capacity, is_live)
        self.draft.set_cache_policy(capacity, is_live)

    def set_max_batch(self, max_batch: int) -> None:
        self.target.set_max_batch(max_batch)
        self.draft.set_max_batch(max_batch)

    def close(self) -> None:
        self.target.close()
        self.draft.close()

    # -- the draft ----------------------------------------------------------------------
    async def ensure_draft(self, target_model: str, requested: str, strict: bool = False) -> Shard | None:
        """The draft for `target_model` loaded (see `draft_in_use`), used by nobody afterwards."""
        async with self.draft_in_use(target_model, requested, strict) as shard:
            return shard

    @asynccontextmanager
    async def draft_in_use(self, target_model: str, requested: str,
                           strict: bool = False) -> AsyncIterator[Shard | None]:
        """The draft for `target_model`, loaded and kept loaded while the block runs; None if
        it cannot be used (see `_load_draft`). Waits its turn when another draft is loaded
        and in use, or others already wait (DraftBusy after `draft_wait_s`)."""
        draft_id = choose_draft(target_model, requested)
        queued = self._draft_for != draft_id or bool(self._swaps)
        if queued:
            self._swaps.append(draft_id)
        try:
            if queued:
                await self._turn(draft_id)
            shard = await self._load_draft(draft_id, target_model, requested, strict)
            if shard is not None:
                self._draft_users += 1
        finally:
            if queued:
                self._swaps.remove(draft_id)
                self._changed()
        try:
            yield shard
        finally:
            if shard is not None:
                self._draft_users -= 1
                self._changed()

    async def _turn(self, draft_id: str) -> None:
        """Until `draft_id` is first in line and loaded, or nobody uses the draft (it may load)."""
        with anyio.move_on_after(self.draft_wait_s):
            while not (self._swaps[0] == draft_id and (self._draft_for == draft_id or not self._draft_users)):
                await self._draft_changed.wait()
            return
        raise DraftBusy(f"draft model {draft_id} cannot be loaded now: the draft engine holds "
                        f"{self._draft_for}, in use by {self._draft_users} request(s), and "
                        f"{len(self._swaps) - 1} other request(s) wait for a draft swap", int(self.draft_wait_s))

    def _changed(self) -> None:
        self._draft_changed.set()
        self._draft_changed = anyio.Event()

    async def _load_draft(self, draft_id: str, target_model: str, requested: str, strict: bool) -> Shard | None:
        """Load the draft `draft_id` for `target_model`; None (and a retry later) if it cannot be used.

        An invalid pairing (unknown pair, different tokenizers) raises ConfigError: that is
        the user's request being wrong, not a transient failure. `strict` (a draft one
        request asked for) also raises ConfigError when the draft cannot be loaded, and
        neither reads nor starts the back-off, which is only for the node's own draft: one
        request's bad draft never costs another request its speculation.
        """
        if self._draft_shard is not None and self._draft_for == draft_id:
            return self._draft_shard
        if not strict and time.monotonic() < self._retry_at:
            return None
        try:
            shard = await self.draft.full_shard(draft_id)
            await self.draft.ensure_shard(shard)
        except Exception as exc:  # noqa: BLE001 - any load failure means "serve without a draft"
            self.draft_load_failures += 1
            if strict:
                log.warning("could not load requested draft model %s: %s", draft_id, exc)
                raise ConfigError(f"draft_model {requested!r} could not be loaded "
                                  f"({type(exc).__name__})") from exc
            self._retry_at = time.monotonic() + self._backoff
            log.warning("could not load draft model %s (%s); decoding without it, retry in %.0f s",
                        draft_id, exc, self._backoff)
            self._backoff = min(self._backoff * 2, RETRY_BACKOFF_S[1])
            return None
        check_tokenizers(self.target.tokenizer, self.draft.tokenizer, target_model, draft_id)
        self._draft_shard, self._draft_for = shard, draft_id
        if not strict:
            self._backoff = RETRY_BACKOFF_S[0]
        return shard

    def draft_is_requested(self, config: SpeculativeConfig) -> bool:
        """Whether `config` names a draft other than the node's own (a request's choice)."""
        return config.draft_model != self.config.draft_model

    # -- generation ---------------------------------------------------------------------
    @asynccontextmanager
    async def generate(self, shard: Shard, prompt: list[int], params: GenerationParams,
                       config: SpeculativeConfig | None = None, request_id: str | None = None,
                       eos_ids: frozenset[int] | None = None,
                       verifier: Verifier | None = None) -> AsyncIterator[AsyncIterator[Emitted]]:
        """A stream of verified blocks (`Emitted`); `config` overrides the engine's for this request.

            async with engine.generate(shard, prompt, params) as blocks:
                async for block in blocks: ...  # block.tokens, .logprobs, .finish_reason

        The request runs while the `async with` is open; leaving it stops the request and
        frees its caches. `verifier` replaces the local target (a ring of nodes holding its
        layers); it must be for `request_id` and `params`.
        """
        config = config or self.config
        request_id = request_id or uuid.uuid4().hex
        if verifier is None:
            await self.target.ensure_shard(shard)
        async with self._request_draft(config, shard.model_id) as draft_shard:
            drafter = resolved_drafter(config, draft_shard is not None)
            if drafter is not None:
                config = msgspec.structs.replace(config, drafter=drafter)
            cost_key = (config.pipelined, shard.model_id, draft_shard.model_id if draft_shard else "",
                        type(verifier).__name__ if verifier is not None else "local")
            request = SpeculativeRequest(
                request_id, list(prompt), params,
                self.target.tokenizer.eos_token_ids if eos_ids is None else eos_ids, config,
                self._controller(config, cost_key, verifier is None),
                events=self.events, node_id=self.node_id,
                shard_label=f"{shard.model_id}:{shard.start_layer}-{shard.end_layer}",
                overlap_prefill=self.overlap_prefill,
            )
            proposer = None
            if drafter is not None:
                proposer = make_proposer(config, self.draft, draft_shard, request.controller)
            elif config.enabled:
                request.draft_failed("draft model unavailable")
            self.last_request = request
            self.requests[request_id] = request
            self._finished.pop(request_id, None)  # a reused id is live again
            try:
                verifier = verifier or TargetVerifier(self.target, shard, request_id, params)
                async with (pipelined_blocks if config.pipelined else sequential_blocks)(request, verifier,
                                                                                         proposer) as blocks:
                    yield blocks
            finally:
                self.target.free_cache(request_id)
                if proposer is not None:
                    proposer.release(request_id)
                if verifier is not None:
                    await verifier.close()
                self.metrics.merge(request.metrics)
                if request.controller.plain_step_time():
                    self._plain_step_time = request.controller.plain_step_time()
                if request.controller.draft_step.value is not None:
                    self._costs[cost_key] = request.controller
                self._retire(request_id)

    @asynccontextmanager
    async def _request_draft(self, config: SpeculativeConfig, target_model: str) -> AsyncIterator[Shard | None]:
        """The draft model a request drafts with, held for its lifetime (None: it drafts without one)."""
        if not (config.enabled and wants_draft_model(config, target_model)):
            yield None
            return
        async with self.draft_in_use(target_model, config.draft_model, self.draft_is_requested(config)) as shard:
            yield shard

    def _retire(self, request_id: str) -> None:
        """Keep a finished request's entry among the latest `keep_finished` finished ones."""
        self._finished[request_id] = None
        while len(self._finished) > self.keep_finished:
            old, _ = self._finished.popitem(last=False)
            self.requests.pop(old, None)

    def _controller(self, config: SpeculativeConfig, cost_key: tuple[bool, str, str, str],
                    local: bool) -> AdaptiveK:
        controller = AdaptiveK(config.max_speculation_depth, config.draft_tokens, config.adaptive_speculation)
        if cost_key in self._costs:
            controller.inherit_costs(self._costs[cost_key])
        stats = self.target.batch_stats() if local else None
        if stats is not None:  # the requests already decoding here share this one's passes
            controller.expect_others(min(stats["active"], stats["max_batch_size"] - 1))
        return controller

    def get_metrics(self) -> dict:
        """Totals over every finished request (plus `last_request` for the latest one)."""
        totals = msgspec.to_builtins(self.metrics.snapshot(self._plain_step_time))
        totals["draft_load_failures"] = self.draft_load_failures
        if self.last_request is not None:
            totals["last_request"] = msgspec.to_builtins(self.request_metrics(self.last_request))
        return totals

    def request_metrics(self, request: SpeculativeRequest) -> MetricsSnapshot:
        return request.metrics.snapshot(request.controller.plain_step_time() or self._plain_step_time)


def wants_draft_model(config: SpeculativeConfig, target_model: str) -> bool:
    """Whether `config` drafts with a model for `target_model`: a named drafter does if the
    registry says it needs one; "auto" does where a draft is named or the pair table knows one."""
    if config.drafter == AUTO:
        return config.draft_model != AUTO or target_model in DRAFT_PAIRS
    return drafter_kind(config.drafter).needs_model


def resolved_drafter(config: SpeculativeConfig, have_draft_model: bool) -> str | None:
    """The drafter to run, None for plain decoding (see the registry's `resolve`): "auto" is
    hybrid with a draft model, the suffix drafter without; a hybrid whose model is
    unavailable degrades to the suffix drafter, a model drafter to none."""
    return resolve(config.drafter, have_draft_model) if config.enabled else None

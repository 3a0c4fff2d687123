"""A discrete-event model of speculative decoding over a ring of pipeline stages.

For rings we cannot build here (4-8 stages, 8B-70B models, real networks) and to explain
the ones we can: per-stage compute as a function of the tokens in a pass, hop latency and
bandwidth, the draft's cost, per-position acceptance and the window W of blocks in flight.

What it models is what the ring does (see DESIGN.md, "The ring with a window"):

- The origin (stage 0's node) drafts blocks of K tokens one after another, each assuming the
  ones before it are fully accepted, and keeps at most W blocks sent but not yet judged.
- A block visits the stages in order; each stage serves blocks first come, first served.
  The last stage judges it and its result travels one hop back to the origin.
- A block's input is its K drafts, plus the last committed token when the block before it
  was not fully accepted with its bonus held back (`defer_bonus`: with more blocks to
  follow, a fully accepted block emits its K drafts and keeps the target's next row, which
  the next block's first draft is judged against).
- A rejection at position j emits j accepted tokens and the correction and ends the epoch:
  the last stage broadcasts it (one hop to every stage at once); a stage drops the old
  epoch's blocks it has queued or that reach it later, uncomputed, and either aborts or
  finishes (and discards) the one it is computing. The origin drafts the next epoch from the
  corrected token once the result reaches it.
- W = 1 with K = 0 is the plain ring: one token per ring pass.

Randomness is only in acceptance (a seeded generator); everything else is deterministic,
so the closed-form cases (W = 1; acceptance 0 or 1) come out exactly.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from exo.speculative.pipeline.window import PRIOR_FULL_RATE, allowed_window, next_full_rate


class StageCost(msgspec.Struct, frozen=True):
    """Seconds a stage takes for one pass over `tokens` tokens: fixed + per_token * tokens."""

    fixed_s: float
    per_token_s: float = 0.0

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


class RingSpec(msgspec.Struct, frozen=True):
    """The hardware: the stages in ring order, the links between them, the draft."""

    stages: list[StageCost]
    hop_s: float = 0.0  # one-way latency of a message between two nodes
    bytes_per_token: float = 0.0  # activation bytes a pass sends to the next stage, per token
    bandwidth_bps: float = math.inf  # bytes per second on each link
    draft_step_s: float = 0.0  # the origin's seconds per drafted token (0: a suffix drafter)
    # The draft computes on stage 0's node and competes with it (one core per node), rather
    # than on a device of its own.
    draft_shares_stage0: bool = False
    # A stage that learns its running block was cancelled stops at once (True) or finishes
    # it and throws the result away (False: what an MLX or tinygrad forward pass does).
    abort_running: bool = False
    # The draft model's prompt pass, run after the first token and before the first block
    # (a scheduler that defers it so the first token never waits for the draft).
    draft_prefill_s: float = 0.0

    def hop(self, tokens: int) -> float:
        return self.hop_s + (tokens * self.bytes_per_token / self.bandwidth_bps if self.bytes_per_token else 0.0)


class Policy(msgspec.Struct, frozen=True):
    """How the ring is driven: K drafts per block (0: plain), W blocks in flight, and the
    probability that draft position i is accepted given positions before it were; or, with
    `blocks`, (K, accepted) pairs measured on a real run, each drafted block drawing one
    (a suffix drafter's K varies with the repeat it copies, and K = 0 is a plain step)."""

    k: int
    window: int = 1
    acceptance: list[float] = []  # per position (the last value repeats); empty: none accepted
    defer_bonus: bool = True  # W > 1 needs it; False is the sequential scheduler's W = 1
    blocks: list[tuple[int, int]] = []
    replay: bool = False  # take `blocks` in order (the i-th judged block is the i-th), not at random
    # > 0: the scheduler's automatic window (exo/speculative/pipeline/window.py) with this
    # threshold, at most `window` blocks.
    min_survival: float = 0.0

    def accepted(self, rng: random.Random) -> int:
        for i in range(self.k):
            a = self.acceptance[min(i, len(self.acceptance) - 1)] if self.acceptance else 0.0
            if a < 1.0 and (a <= 0.0 or rng.random() >= a):
                return i
        return self.k

    def draw(self, rng: random.Random, position: int) -> tuple[int, int]:
        """The size of the block `position` blocks after the first, and how many of its
        drafts the target will accept."""
        if self.blocks:
            return self.blocks[position % len(self.blocks) if self.replay else rng.randrange(len(self.blocks))]
        return self.k, self.accepted(rng)


class StageStats(msgspec.Struct):
    busy_s: float = 0.0  # computing blocks whose result counted
    discarded_s: float = 0.0  # computing blocks of an epoch that had already ended
    dropped: int = 0  # blocks dropped uncomputed (cancelled before this stage reached them)
    passes: int = 0  # passes computed (kept or discarded)


class SimResult(msgspec.Struct):
    tokens: int
    seconds: float
    stages: list[StageStats]
    blocks: int  # judged blocks
    messages: int  # forwards, results and cancellation broadcasts
    bytes_sent: float
    draft_s: float  # the origin's drafting time

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def idle_s(self, stage: int) -> float:
        s = self.stages[stage]
        return max(0.0, self.seconds - s.busy_s - s.discarded_s)


@dataclass
class _Job:
    """A block to compute, or (on stage 0, when the draft shares its core) a draft to run."""

    epoch: int
    inputs: int  # tokens the stages compute for it
    defer: bool  # a fully accepted block holds its bonus back
    draft_s: float = 0.0  # > 0: this job is the draft of `block`
    block: "_Job | None" = None
    k: int = 0
    accepted: int = 0  # decided when drafted (the target's verdict is fixed by the text)


@dataclass(order=True)
class _Event:
    time: float
    order: int
    action: Callable[[], None] = field(compare=False)


class _Ring:
    def __init__(self, spec: RingSpec, policy: Policy, want: int, seed: int):
        if not spec.stages:
            raise ValueError("a ring needs at least one stage")
        if policy.k < 0 or policy.window < 1:
            raise ValueError(f"need K >= 0 and W >= 1, got K={policy.k}, W={policy.window}")
        if policy.window > 1 and not policy.defer_bonus:
            raise ValueError("a window of more than one block needs defer_bonus")
        self.spec, self.policy, self.want = spec, policy, want
        self.last = len(spec.stages) - 1
        self.rng = random.Random(seed)
        self.events: list[_Event] = []
        self.order = itertools.count()
        self.cancelled: set[int] = set()  # events of aborted passes
        self.now = 0.0
        self.stats = [StageStats() for _ in spec.stages]
        self.queues: list[list[_Job]] = [[] for _ in spec.stages]
        self.running: list[tuple[_Job, float, int] | None] = [None] * len(spec.stages)  # job, start, event
        self.stage_epoch = [0] * len(spec.stages)  # the newest epoch each stage has heard of
        self.committed = 0
        self.epoch = 0
        self.in_flight = 0  # blocks of this epoch drafted or sent and not yet judged
        self.pending_row = False  # the last judged block held its bonus back
        self.drafting = False
        self.draft_event: int | None = None  # the running draft's completion (not stage 0's)
        self.next_block: tuple[int, int] | None = None  # drawn, not drafted yet
        self.full_rate = PRIOR_FULL_RATE  # the automatic window's estimate (Policy.min_survival)
        self.plain_in_flight = False  # a K = 0 step is out: nothing follows it until its verdict
        self.blocks = self.messages = 0
        self.bytes_sent = self.draft_s = 0.0
        self.finished_at: float | None = None

    def at(self, delay: float, action: Callable[[], None]) -> int:
        order = next(self.order)
        heapq.heappush(self.events, _Event(self.now + delay, order, action))
        return order

    def run(self) -> SimResult:
        if self.spec.draft_prefill_s:
            self.draft_s += self.spec.draft_prefill_s
            self.at(self.spec.draft_prefill_s, self.maybe_draft)
        else:
            self.maybe_draft()
        while self.events and self.finished_at is None:
            event = heapq.heappop(self.events)
            if event.order in self.cancelled:
                continue
            self.now = event.time
            event.action()
        return SimResult(self.committed, self.finished_at or self.now, self.stats, self.blocks, self.messages,
                         self.bytes_sent, self.draft_s)

    # -- the origin -------------------------------------------------------------------------
    def maybe_draft(self) -> None:
        """Draft the next block if the window has room (one draft at a time). A plain step
        (K = 0) waits for every block in flight, and nothing follows it until its verdict."""
        window = self.policy.window
        if self.policy.min_survival > 0:
            window = allowed_window(window, self.full_rate, self.policy.min_survival)
        if self.drafting or self.in_flight >= window or self.plain_in_flight or self.finished_at is not None:
            return
        if self.next_block is None:
            self.next_block = self.policy.draw(self.rng, self.blocks + self.in_flight)
        k, accepted = self.next_block
        if k == 0 and self.in_flight:
            return
        self.next_block = None
        # The first block after a verdict without a held row also feeds the last committed token.
        feeds_last = self.in_flight == 0 and not self.pending_row
        block = _Job(self.epoch, k + feeds_last, self.policy.defer_bonus, k=k, accepted=accepted)
        self.in_flight += 1
        self.plain_in_flight = k == 0
        self.drafting = True
        seconds = k * self.spec.draft_step_s
        self.draft_s += seconds
        if self.spec.draft_shares_stage0 and seconds:
            self.queues[0].append(_Job(block.epoch, 0, False, seconds, block))
            self.serve(0)
        else:
            self.draft_event = self.at(seconds, lambda: self.drafted(block))

    def drafted(self, block: _Job) -> None:
        self.drafting, self.draft_event = False, None
        if block.epoch == self.epoch:  # else the epoch ended while it was drafted: drop it
            if block.inputs == 0:  # only the last stage's held row is sampled: it alone is asked
                self.send(0, lambda: self.judge(block))
            else:
                self.arrive(0, block)
        self.maybe_draft()

    def result(self, block: _Job, accepted: int) -> None:
        """The origin learns a block's verdict."""
        if block.epoch != self.epoch:
            return
        self.blocks += 1
        self.in_flight -= 1
        self.plain_in_flight = False
        full = accepted == block.k
        deferred = full and block.defer and block.k > 0
        self.full_rate = next_full_rate(self.full_rate, block.k, not deferred)
        self.committed += accepted + (not deferred)
        self.pending_row = deferred
        if not full:
            self.epoch += 1
            self.in_flight = 0
            self.next_block = None  # drawn for a position the rejection has moved
            self.abandon_draft()
        if self.committed >= self.want:
            self.finished_at = self.now
            return
        self.maybe_draft()

    def abandon_draft(self) -> None:
        """A draft of the ended epoch stops at once (the drafter is told it was interrupted)."""
        if self.draft_event is not None:
            self.cancelled.add(self.draft_event)
        elif self.drafting:  # on stage 0's core: queued, or running there
            self.queues[0] = [job for job in self.queues[0] if not job.draft_s]
            running = self.running[0]
            if running is not None and running[0].draft_s:
                self.cancelled.add(running[2])
                self.running[0] = None
                self.serve(0)
        self.drafting, self.draft_event = False, None

    # -- the stages -------------------------------------------------------------------------
    def arrive(self, stage: int, job: _Job) -> None:
        if job.epoch < self.stage_epoch[stage]:
            self.stats[stage].dropped += 1
            return
        self.queues[stage].append(job)
        self.serve(stage)

    def serve(self, stage: int) -> None:
        while self.running[stage] is None and self.queues[stage]:
            job = self.queues[stage].pop(0)
            if job.draft_s:
                seconds = job.draft_s
            elif job.epoch < self.stage_epoch[stage]:
                self.stats[stage].dropped += 1
                continue
            else:
                seconds = self.spec.stages[stage].seconds(job.inputs)
            order = self.at(seconds, lambda: self.computed(stage, job))
            self.running[stage] = (job, self.now, order)

    def computed(self, stage: int, job: _Job) -> None:
        _, started, _ = self.running[stage]
        self.running[stage] = None
        if job.draft_s:
            self.drafted(job.block)
        elif job.epoch < self.stage_epoch[stage]:
            self.stats[stage].passes += 1
            self.stats[stage].discarded_s += self.now - started
        else:
            self.stats[stage].passes += 1
            self.stats[stage].busy_s += self.now - started
            if stage < self.last:
                self.send(job.inputs, lambda: self.arrive(stage + 1, job))
            else:
                self.judge(job)
        self.serve(stage)

    def judge(self, block: _Job) -> None:
        accepted = block.accepted
        if accepted < block.k:  # the epoch ends: the last stage knows now, the others a hop later
            epoch = block.epoch + 1
            self.cancel(self.last, epoch)
            for stage in range(self.last):
                self.messages += 1
                self.at(self.spec.hop_s, lambda s=stage: self.cancel(s, epoch))
        self.send(0, lambda: self.result(block, accepted))

    def send(self, tokens: int, action: Callable[[], None]) -> None:
        """A message to the next stage (`tokens` of activations) or to the origin (none)."""
        if self.last == 0:  # one node: nothing travels
            self.at(0.0, action)
            return
        self.messages += 1
        self.bytes_sent += tokens * self.spec.bytes_per_token
        self.at(self.spec.hop(tokens), action)

    def cancel(self, stage: int, epoch: int) -> None:
        if epoch <= self.stage_epoch[stage]:
            return
        self.stage_epoch[stage] = epoch
        kept = [job for job in self.queues[stage] if job.draft_s or job.epoch >= epoch]
        self.stats[stage].dropped += len(self.queues[stage]) - len(kept)
        self.queues[stage] = kept
        running = self.running[stage]
        if running is not None and self.spec.abort_running and not running[0].draft_s and running[0].epoch < epoch:
            _, started, order = running
            self.cancelled.add(order)
            self.stats[stage].passes += 1
            self.stats[stage].discarded_s += self.now - started
            self.running[stage] = None
            self.serve(stage)


def simulate(spec: RingSpec, policy: Policy, tokens: int = 2000, seed: int = 0) -> SimResult:
    """Run the ring until `tokens` tokens are committed; the clock starts at the first draft
    (the prompt pass is not modelled)."""
    return _Ring(spec, policy, tokens, seed).run()


def plain_ring(spec: RingSpec, tokens: int = 2000) -> SimResult:
    """Plain pipeline-parallel decoding: one token per ring pass."""
    return simulate(spec, Policy(k=0, window=1, defer_bonus=False), tokens)

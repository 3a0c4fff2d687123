"""Continuous batching of one engine's forward calls: calls that are ready at the same moment
share one pass.

Decoding reads every weight once per pass whatever the number of rows, so B requests
stepping together cost little more than one. Each request keeps its own calls (prefill,
draft step, verify block, plain step), made one at a time; this groups whatever calls are
waiting when the engine frees up, so a request joins the batch at its next call and leaves
it by not making one.

No task runs the batches. The first caller to find the engine idle leads: it takes the
oldest waiting calls (at most `max_size`, so with more requests than that they take turns in
arrival order and none waits more than ceil(waiting / max_size) passes), runs them in one
pass and hands the lead to the oldest call still waiting. A leader that is cancelled still
finishes the pass it started (shielded: its partners' results are in it) and then raises; a
waiting call that is cancelled just leaves the queue, and a follower cancelled while its row
is in a running pass gets its cancellation at once (the pass finishes without it).

A pass also holds at most `budget` input positions (the oldest call always goes, however
long): the MLX engine sets it to the bound within which its products compute each row as
alone, so a pass never mixes a long prompt with other rows. Several prompts then run one per
pass and each request gets its first token as soon as its own prompt is through, as without
batching, instead of all of them waiting for the sum.

Before a pass the leader waits a little (`gather_fraction` of the last pass's duration) for
the engine's other active requests, which are between two of their calls, to join: without
it two groups of requests settle into alternate passes, each paying almost a full pass for
half the rows. With one active request, or with `max_size` 1, nobody waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, TypeVar

import anyio

I = TypeVar("I")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 8
GATHER_FRACTION = 0.15


@dataclass(eq=False)
class _Call(Generic[I, R]):
    item: I
    wake: anyio.Event = field(default_factory=anyio.Event)
    lead: bool = False  # woken to run the next pass, not with a result
    taken: bool = False  # in a pass (shielded): it runs whether or not its caller still waits
    done: bool = False
    result: R | None = None
    error: BaseException | None = None
    record: "PassRecord | None" = None


@dataclass(frozen=True)
class PassRecord:
    """One pass as the batcher saw it."""
    rows: int  # calls in it
    positions: int  # input positions over all of them
    seconds: float


class StepBatcher(Generic[I, R]):
    def __init__(self, run: Callable[[list[I]], Awaitable[list[R | BaseException]]],
                 size: Callable[[I], int], active: Callable[[], int], max_size: int = DEFAULT_MAX_BATCH,
                 gather_fraction: float = GATHER_FRACTION):
        """`run(items)` computes one pass and returns each item's result or exception (one bad
        row fails alone); `size(item)` is its input positions; `active()` how many requests
        the engine is serving now (the most that can join)."""
        self._run, self._size, self._active = run, size, active
        self.max_size = max_size
        self.budget: int | None = None  # input positions a pass may hold (None: any)
        self.gather_fraction = gather_fraction
        self._waiting: list[_Call[I, R]] = []
        self._busy = False  # a leader holds the engine (or has been chosen and is waking)
        self._arrived = anyio.Event()
        self.last: PassRecord | None = None
        self.passes = 0
        self.batched_rows = 0  # rows that shared a pass with at least one other
        self.most_rows = 0  # the largest pass so far

    def set_max_size(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"a batch holds at least one call, got {max_size}")
        self.max_size = max_size

    async def submit(self, item: I) -> tuple[R, PassRecord]:
        """`item`'s result and the pass it ran in."""
        call: _Call[I, R] = _Call(item)
        self._waiting.append(call)
        self._arrived.set()
        if self._busy:
            try:
                await call.wake.wait()
            except BaseException:
                self._leave(call)
                raise
        else:
            self._busy = True
        if not call.done:
            await self._lead(call)
        if call.error is not None:
            raise call.error
        assert call.record is not None
        return call.result, call.record  # type: ignore[return-value]

    async def _lead(self, call: _Call[I, R]) -> None:
        """Run one pass holding `call` (the oldest waiting), then hand the engine on."""
        try:
            await self._gather()
        except BaseException:  # the leader leaves before its pass: the engine goes to the next in line
            self._waiting.remove(call)
            self._hand_over()
            raise
        batch = self._take()
        started = time.perf_counter()
        try:
            with anyio.CancelScope(shield=True):
                outcomes = await self._run([c.item for c in batch])
        except BaseException as exc:  # the pass itself failed: every row gets its error
            outcomes = [exc] * len(batch)
            if not isinstance(exc, Exception):
                self._finish(batch, outcomes, started)
                raise
        self._finish(batch, outcomes, started)

    def _take(self) -> list[_Call[I, R]]:
        """The oldest waiting calls that fit the bounds, in order (the oldest always)."""
        count, positions = 0, 0
        for c in self._waiting:
            size = self._size(c.item)
            if count == self.max_size or (count and self.budget is not None and positions + size > self.budget):
                break
            count, positions = count + 1, positions + size
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        for c in batch:
            c.taken = True
        return batch

    def _leave(self, call: _Call[I, R]) -> None:
        """A cancelled call: out of the queue if it still waits there (handing the lead on if
        it had been given it). One already taken into a pass is left to it: the pass runs
        shielded for its partners, and its result is dropped with nobody to read it."""
        if call.taken or call.done:
            return
        self._waiting.remove(call)
        if call.lead:
            self._hand_over()

    def _finish(self, batch: list[_Call[I, R]], outcomes: list, started: float) -> None:
        record = PassRecord(len(batch), sum(self._size(c.item) for c in batch), time.perf_counter() - started)
        self.last, self.passes = record, self.passes + 1
        self.most_rows = max(self.most_rows, record.rows)
        if len(batch) > 1:
            self.batched_rows += len(batch)
        for c, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                c.error = outcome
            else:
                c.result = outcome
            c.record, c.done = record, True
            c.wake.set()
        self._hand_over()

    async def _gather(self) -> None:
        """Wait up to a fraction of the last pass for more of the active requests to arrive."""
        if self.max_size == 1 or self.last is None:
            return
        deadline = time.perf_counter() + self.gather_fraction * self.last.seconds
        while len(self._waiting) < min(self._active(), self.max_size):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived = anyio.Event()
            with anyio.move_on_after(left):
                await self._arrived.wait()

    def _hand_over(self) -> None:
        """Give the engine to the oldest waiting call, or leave it idle."""
        if self._waiting:
            successor = self._waiting[0]
            successor.lead = True
            successor.wake.set()
        else:
            self._busy = False

"""Run a request's scheduler in a task group its caller owns; the caller reads a stream.

The schedulers are coroutines that send each verified block's emitted tokens to a memory
stream. `run_scheduler` is an async context manager, so that task group lives in the
caller's `async with` and no generator ever suspends with a task group open (PEP 789).
Leaving the `async with`, at the end, early or by an error, stops the scheduler: there is
no `aclose()` for a consumer to forget.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from exo.speculative.drafters import Proposer
from exo.speculative.pipeline.common import SpeculativeRequest
from exo.speculative.pipeline.pipelined import run_pipelined
from exo.speculative.pipeline.sequential import run_sequential
from exo.speculative.verifier import Verifier

Scheduler = Callable[[SpeculativeRequest, Verifier, Proposer | None, ObjectSendStream[list[int]]], Awaitable[None]]


def _scheduler(pipelined: bool) -> tuple[Scheduler, float]:
    """The scheduler and how many blocks it may emit ahead of the consumer. Sequentially
    none: the next block starts once this one is taken, so what the consumer reads of the
    request (finish reason, log-probs) is still this block's. The pipelined verifier never
    waits for the consumer."""
    return (run_pipelined, math.inf) if pipelined else (run_sequential, 0)


@asynccontextmanager
async def run_scheduler(request: SpeculativeRequest, verifier: Verifier, proposer: Proposer | None,
                        pipelined: bool) -> AsyncIterator[ObjectReceiveStream[list[int]]]:
    """The request's emitted blocks, in order, while its scheduler runs; a failure of the
    scheduler comes out of the `async with` as itself, not wrapped in an exception group."""
    scheduler, ahead = _scheduler(pipelined)
    send, receive = anyio.create_memory_object_stream[list[int]](ahead)
    with send, receive:  # closed even if the scheduler is cancelled before it starts
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_produce, scheduler, request, verifier, proposer, send)
                try:
                    yield receive
                finally:
                    group.cancel_scope.cancel()  # the consumer is done: whatever is left is moot
        except BaseExceptionGroup as error:
            raise single_error(error) from None


async def _produce(scheduler: Scheduler, request: SpeculativeRequest, verifier: Verifier,
                   proposer: Proposer | None, send: ObjectSendStream[list[int]]) -> None:
    async with send:  # the request's end is the stream's
        await scheduler(request, verifier, proposer, send)


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one real failure inside (nested) task-group errors, so callers see a plain error."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    real = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    return (real or leaves)[0]

"""Admission: a bounded number of live requests per node, the rest wait in a fair queue.

A node that took every request at once would need a KV cache per request; past what memory
(or the engine's cache table) holds, some would have to be evicted mid-generation. Instead
a request takes a slot before any engine work and keeps it until its generation ends; when
all `max_live` slots are taken it waits, first come first served, at most `queue_timeout_s`;
when `max_queued` requests already wait it is refused at once. Both refusals raise
`AdmissionRejected`, which the API answers with 429 and `Retry-After`.

A slot freed by a finishing request goes straight to the oldest waiter (no barging), and a
waiter that is cancelled or times out leaves the queue without losing a slot it may have
been handed in the same instant.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio

log = logging.getLogger("exo.admission")

QUEUE_FULL, QUEUE_TIMEOUT = "queue_full", "queue_timeout"
MAX_AUTO_LIVE = 64  # the memory rule's ceiling: past this, requests gain little from concurrency


class AdmissionRejected(Exception):
    """The request was not admitted; `reason` is QUEUE_FULL or QUEUE_TIMEOUT."""

    def __init__(self, reason: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


class _Waiter:
    __slots__ = ("request_id", "event", "granted")

    def __init__(self, request_id: str):
        self.request_id, self.event, self.granted = request_id, anyio.Event(), False


class AdmissionGate:
    """Slots for live requests, keyed by request id; one per node, used from its event loop."""

    def __init__(self, max_live: int, max_queued: int = 64, queue_timeout_s: float = 60.0):
        if max_live < 1:
            raise ValueError(f"max_live must be at least 1, got {max_live}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be at least 0, got {max_queued}")
        if queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be positive, got {queue_timeout_s}")
        self.max_live, self.max_queued, self.queue_timeout_s = max_live, max_queued, queue_timeout_s
        self._live: dict[str, float] = {}  # request id -> when it was admitted
        self._queue: deque[_Waiter] = deque()
        self.admitted = 0
        self.wait_seconds = 0.0  # total time admitted requests spent queued
        self._mean_hold_s = 0.0  # moving average of how long a request keeps its slot

    # -- state ---------------------------------------------------------------------------
    @property
    def live(self) -> list[str]:
        return list(self._live)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def holds(self, request_id: str) -> bool:
        """Whether `request_id` has a slot (read by engine threads to spare its cache)."""
        return request_id in self._live

    def resize(self, max_live: int) -> None:
        """Change the limit; a larger one admits waiters at once (live requests are never cut)."""
        if max_live < 1:
            raise ValueError(f"max_live must be at least 1, got {max_live}")
        self.max_live = max_live
        self._grant_waiters()

    def retry_after_s(self) -> int:
        """A hint for a refused client: the time the queue ahead of it needs to drain."""
        per_slot = self._mean_hold_s or 1.0
        ahead = len(self._queue) + 1
        return max(1, min(int(self.queue_timeout_s), math.ceil(per_slot * ahead / self.max_live)))

    # -- slots ---------------------------------------------------------------------------
    async def acquire(self, request_id: str) -> None:
        """Take a slot for `request_id`, waiting in line; raise AdmissionRejected if the queue
        is full or the wait exceeds `queue_timeout_s`."""
        if request_id in self._live:
            raise ValueError(f"request {request_id!r} already holds a slot")
        if len(self._live) < self.max_live and not self._queue:
            self._take(request_id)
            return
        if len(self._queue) >= self.max_queued:
            raise AdmissionRejected(QUEUE_FULL, f"server busy: {len(self._live)} requests running and "
                                                f"{len(self._queue)} waiting (the queue's limit)",
                                    self.retry_after_s())
        waiter = _Waiter(request_id)
        self._queue.append(waiter)
        started = time.monotonic()
        try:
            with anyio.move_on_after(self.queue_timeout_s):
                await waiter.event.wait()
        except BaseException:  # cancelled while waiting: leave the line (or pass on a granted slot)
            self._leave(waiter)
            raise
        if not waiter.granted:
            self._leave(waiter)
            raise AdmissionRejected(QUEUE_TIMEOUT, f"server busy: no slot within {self.queue_timeout_s:g} s "
                                                   f"({len(self._live)} requests running)", self.retry_after_s())
        self.wait_seconds += time.monotonic() - started

    def release(self, request_id: str) -> None:
        """Give the slot back (idempotent); the oldest waiter gets it."""
        admitted = self._live.pop(request_id, None)
        if admitted is None:
            return
        held = time.monotonic() - admitted
        self._mean_hold_s = held if not self._mean_hold_s else 0.8 * self._mean_hold_s + 0.2 * held
        self._grant_waiters()

    @asynccontextmanager
    async def admit(self, request_id: str) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`."""
        await self.acquire(request_id)
        try:
            yield
        finally:
            self.release(request_id)

    def _take(self, request_id: str) -> None:
        self._live[request_id] = time.monotonic()
        self.admitted += 1

    def _grant_waiters(self) -> None:
        while self._queue and len(self._live) < self.max_live:
            waiter = self._queue.popleft()
            waiter.granted = True
            self._take(waiter.request_id)
            waiter.event.set()

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.granted:
            self.release(waiter.request_id)
        else:
            try:
                self._queue.remove(waiter)
            except ValueError:
                pass  # not queued any more


# -- the default limit ---------------------------------------------------------------------
def kv_bytes_per_token(model_config: dict, dtype_bytes: int = 4) -> int:
    """Keys and values of one token over every layer of a Hugging Face-style model config."""
    layers = int(model_config["num_hidden_layers"])
    heads = int(model_config["num_attention_heads"])
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    head_dim = int(model_config.get("head_dim") or model_config["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def max_live_from_memory(model_config: dict, context_tokens: int, free_bytes: int, dtype_bytes: int = 4,
                         share: float = 0.5, ceiling: int = MAX_AUTO_LIVE) -> int:
    """The default of --max-concurrent-requests: how many requests of `context_tokens` fit
    their KV caches (target, and as much again for the draft and activations) into `share`
    of the free memory, between 1 and `ceiling`."""
    per_request = 2 * kv_bytes_per_token(model_config, dtype_bytes) * max(1, context_tokens)
    fits = int(share * max(0, free_bytes) // per_request)
    return max(1, min(ceiling, fits))


def available_memory() -> int:
    """Bytes the OS could give this process now (MemAvailable on Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0

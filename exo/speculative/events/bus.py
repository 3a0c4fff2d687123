"""In-node event bus: publishing never waits for subscribers.

Each subscriber has a bounded buffer; when it is full the oldest event is dropped and
counted, so a slow dashboard can never slow generation down.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import AsyncIterator, Callable, Iterator

import anyio

from exo.speculative.events.types import Event


class Subscription:
    def __init__(self, capacity: int, accepts: Callable[[Event], bool]):
        self._buffer: deque[Event] = deque(maxlen=capacity)
        self._ready = anyio.Event()
        self.accepts = accepts
        self.dropped = 0
        self.closed = False

    def offer(self, event: Event) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(event)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self.closed:
                raise StopAsyncIteration
            self._ready = anyio.Event()
            await self._ready.wait()
        return self._buffer.popleft()


class EventBus:
    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._subscriptions: list[Subscription] = []
        self.published = 0

    def publish(self, event: Event) -> None:
        """Deliver to every subscriber without blocking (drop-oldest when one lags)."""
        self.published += 1
        for subscription in list(self._subscriptions):
            if subscription.accepts(event):
                subscription.offer(event)

    @contextmanager
    def subscribe(self, accepts: Callable[[Event], bool] = lambda _: True,
                  capacity: int | None = None) -> Iterator[Subscription]:
        """`with bus.subscribe() as events: async for event in events: ...`"""
        subscription = Subscription(capacity or self.capacity, accepts)
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)
            subscription.close()

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self._subscriptions)

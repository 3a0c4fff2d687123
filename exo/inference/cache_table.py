"""The per-request KV cache table an engine keeps: bounded, and never evicting a live request.

Each backend keeps its own cache representation behind `RequestCache` (how many positions it
holds, and an exact trim); the table owns what is common: `offset` and the bounds check of
`trim` (the engine contract, stated on `InferenceEngine`).

A cache that disappears under a request that is still generating makes its next step fail
("cannot keep 36 tokens, cache holds 1"). So the bound is an admission bound: when the table
is full, only caches of requests the owner reports as finished (`is_live` false) are dropped,
least recently used first; if every cache belongs to a live request, the new request is
refused with `CacheTableFull` before any cache is touched. Without an `is_live` predicate
every cache counts as live (requests leave the table through `free_cache`).

The owning engine touches the table from its one worker thread (and `free_cache` from the
event loop, as before); `is_live` is called from the worker thread and must only read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Generic, Iterator, Protocol, TypeVar

log = logging.getLogger("exo.inference")

DEFAULT_CAPACITY = 16


class CacheTableFull(RuntimeError):
    """Every slot of the table holds a live request's cache; the new request cannot start."""


class RequestCache(Protocol):
    """One request's KV cache as a backend represents it."""

    @property
    def offset(self) -> int:
        """Positions the cache holds."""

    def trim(self, n_tokens: int) -> None:
        """Drop the last `n_tokens` positions (0 < n_tokens <= offset) exactly, or raise."""


C = TypeVar("C", bound=RequestCache)


class CacheTable(Generic[C]):
    def __init__(self, capacity: int = DEFAULT_CAPACITY, is_live: Callable[[str], bool] | None = None):
        self._entries: OrderedDict[str, C] = OrderedDict()
        self.capacity = capacity
        self.is_live = is_live
        self.evicted = 0  # caches of finished requests dropped to make room

    def set_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        """Bound the table at `capacity` live requests (the owner's admission limit)."""
        if capacity < 1:
            raise ValueError(f"a cache table needs room for at least one request, got {capacity}")
        self.capacity, self.is_live = capacity, is_live

    def get_or_create(self, request_id: str, make: Callable[[], C]) -> C:
        """The request's cache, made with `make()` if it has none (refusing, not evicting, when
        the table is full of live requests)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            self._entries.move_to_end(request_id)
            return entry
        if len(self._entries) >= self.capacity:
            self._drop_finished(len(self._entries) - self.capacity + 1)
        if len(self._entries) >= self.capacity:
            raise CacheTableFull(
                f"cannot start request {request_id!r}: the KV cache table holds {len(self._entries)} live "
                f"requests, its limit (--max-concurrent-requests); no live request's cache is evicted")
        entry = self._entries[request_id] = make()
        return entry

    def _drop_finished(self, wanted: int) -> None:
        if self.is_live is None:
            return
        finished = [rid for rid in list(self._entries) if not self.is_live(rid)][:wanted]
        for rid in finished:
            self._entries.pop(rid, None)
            self.evicted += 1
            log.info("dropped the KV cache of finished request %s to make room", rid)

    def offset(self, request_id: str) -> int:
        """Positions the request's cache holds (0 if it has none)."""
        entry = self._entries.get(request_id)
        return entry.offset if entry is not None else 0

    def trim(self, request_id: str, n_tokens: int) -> None:
        """Drop the request's last `n_tokens` exactly; a count it does not hold raises
        ValueError before anything changes."""
        if n_tokens == 0:
            return
        held = self.offset(request_id)
        if n_tokens < 0 or n_tokens > held:
            raise ValueError(f"cannot trim {n_tokens} tokens from request {request_id!r} holding {held}")
        self._entries[request_id].trim(n_tokens)

    # -- a read-mostly mapping -------------------------------------------------------------
    def get(self, request_id: str) -> C | None:
        return self._entries.get(request_id)

    def pop(self, request_id: str, default: C | None = None) -> C | None:
        return self._entries.pop(request_id, default)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

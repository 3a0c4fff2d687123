"""The worker-thread base both in-process engines (MLX, tinygrad) share.

A forward pass must not block the event loop, and neither backend may be driven from two
threads at once, so each engine runs every model call on one worker thread, which also owns
the loaded model and every request's KV cache (the thread-confinement rule of the contract on
`InferenceEngine`). Which thread is a backend's one explicit choice, `worker_scope`:

- "engine": a thread of its own per engine (MLX: its streams are per thread, and a draft and
  a target on two threads overlap);
- "process": one thread per backend shared by every engine of the process (tinygrad: its
  global state is not thread-safe).

A subclass supplies only what is its own: `_load_model` (weights), `_make_cache` (its
`RequestCache`) and `_forward` (one pass at the cache's offset, advancing it), and may
supply `_forward_rows` (one pass over several requests' rows; by default they run one after
the other). Forward calls go through a `StepBatcher` (exo/inference/batching.py): calls of
different requests that wait at the same moment become one `_forward_rows`.

A forward call holds the loaded shard from its check to the end of its pass: a reload (another
model, or another layer range) waits for the calls in flight and holds back new ones, so a
pass never computes a row with weights other than those its call was made for.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, ClassVar, Generic, Literal, TypeVar

import anyio
import numpy as np

from exo.inference.batching import DEFAULT_MAX_BATCH, StepBatcher
from exo.inference.cache_table import DEFAULT_CAPACITY, C, CacheTable
from exo.inference.engine import HEAD_ROWS, LAST_POSITIONS, PASS, InferenceEngine, check_context
from exo.inference.head_rows import HeadRows
from exo.inference.shard import Shard
from exo.inference.tokenizer import load_tokenizer

T = TypeVar("T")
WorkerScope = Literal["engine", "process"]

_shared_workers: dict[str, ThreadPoolExecutor] = {}
_shared_lock = threading.Lock()


def _worker(scope: WorkerScope, name: str) -> ThreadPoolExecutor:
    """A new thread for "engine"; for "process", the one named `name` (started on first use,
    joined at interpreter exit)."""
    if scope == "engine":
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    with _shared_lock:
        if name not in _shared_workers:
            _shared_workers[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return _shared_workers[name]


@dataclass(frozen=True)
class StepRow:
    """One request's input for a pass, as `infer_tensor` got it."""
    request_id: str
    x: np.ndarray
    last_positions: int | None
    head_rows: HeadRows | None
    shard: Shard | None = None  # the shard its call was made for (None: whatever is loaded)

    @property
    def positions(self) -> int:
        return int(self.x.shape[1]) if self.x.ndim >= 2 else 0


class ThreadedEngine(InferenceEngine, Generic[C]):
    worker_scope: ClassVar[WorkerScope]

    def __init__(self, model_dir_for: Callable[[str], Path] | None = None, *, max_caches: int = DEFAULT_CAPACITY,
                 max_batch: int = DEFAULT_MAX_BATCH):
        """`model_dir_for(model_id)` returns a local model directory, fetching it if needed."""
        if model_dir_for is None:
            from exo.inference.sources import model_dir_for as default_resolver
            model_dir_for = default_resolver
        self.model_dir_for = model_dir_for
        self._executor = _worker(self.worker_scope, f"exo-{self.name}")
        self._closed = False
        self._load_lock = anyio.Lock()
        self._users = 0  # forward calls holding the loaded shard (from their check to their pass's end)
        self._reloading = False  # a load waits for them; new calls wait for it
        self._drained = anyio.Event()
        self._caches: CacheTable[C] = CacheTable(max_caches)
        self.batcher: StepBatcher[StepRow, np.ndarray] = StepBatcher(
            self._run_rows, lambda row: row.positions, lambda: len(self._caches), max_batch)
        self.model: Any = None  # the backend's model; its `max_context` bounds every request
        self.shard: Shard | None = None
        self.tokenizer: Any = None
        self.model_dir: Path | None = None

    # -- what a backend supplies (all called on the worker thread) ------------------------------
    @abstractmethod
    def _load_model(self, shard: Shard, model_dir: Path) -> Any:
        """Build and load `shard` of the model in `model_dir` (it has a `max_context`: int | None)."""

    @abstractmethod
    def _make_cache(self) -> C:
        """An empty KV cache for one request of the loaded model."""

    @abstractmethod
    def _forward(self, x: np.ndarray, cache: C, last_positions: int | None,
                 head_rows: HeadRows | None) -> np.ndarray:
        """Run checked input `x` at `cache.offset`, advance the cache by its length, return
        the output as numpy (on a last shard, only the `head_rows` columns of the logits)."""

    def _forward_rows(self, rows: list[tuple[StepRow, C]]) -> list[np.ndarray]:
        """Several requests' checked rows (distinct requests), each with its cache: one after
        the other unless the backend can run them as one pass."""
        return [self._forward(row.x, cache, row.last_positions, self._head(row)) for row, cache in rows]

    def _head(self, row: StepRow) -> HeadRows | None:
        return row.head_rows if self.shard.is_last_layer() else None

    # -- calls --------------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the worker thread without blocking the event loop."""
        if self._closed:
            raise RuntimeError(f"{self.name} engine is closed")
        future: Future[T] = self._executor.submit(fn, *args)
        # Waiting happens in anyio's pool; on cancellation the call finishes and is dropped.
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def ensure_shard(self, shard: Shard) -> None:
        async with self._load_lock:
            if self.shard == shard:
                return
            model_dir = await anyio.to_thread.run_sync(self.model_dir_for, shard.model_id)
            await self._reload(shard, model_dir)

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        async with self._load_lock:
            await self._reload(shard, Path(path))

    async def _reload(self, shard: Shard, model_dir: Path) -> None:
        """Load once no forward call holds the current shard (the load lock is held)."""
        self._reloading = True
        try:
            while self._users:
                self._drained = anyio.Event()
                await self._drained.wait()
            await self._run(self._load, shard, model_dir)
        finally:
            self._reloading = False

    @asynccontextmanager
    async def _holding(self, shard: Shard) -> AsyncIterator[None]:
        """`shard` loaded, and kept loaded until the block ends."""
        while self.shard != shard or self._reloading:
            await self.ensure_shard(shard)  # waits for a reload in progress, then loads if need be
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                self._drained.set()

    def _load(self, shard: Shard, model_dir: Path) -> None:
        model = self._load_model(shard, model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.model, self.shard, self.model_dir = model, shard, model_dir
        self._caches.clear()

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        """Run the request's input at its offset, in one pass with whichever other requests'
        calls are waiting; the returned state adds `PASS`, the pass it ran in."""
        state = inference_state or {}
        rows = state.get(HEAD_ROWS)
        rows = HeadRows.of(rows) if rows is not None else None
        async with self._holding(shard):
            out, record = await self.batcher.submit(StepRow(request_id, np.asarray(input_data),
                                                            state.get(LAST_POSITIONS), rows, shard))
        return out, {**state, PASS: record}

    def set_max_batch(self, max_batch: int) -> None:
        self.batcher.set_max_size(max_batch)

    def batch_stats(self) -> dict | None:
        b = self.batcher
        return {"passes": b.passes, "batched_rows": b.batched_rows, "most_rows": b.most_rows,
                "max_batch_size": b.max_size, "active": len(self._caches)}

    async def _run_rows(self, rows: list[StepRow]) -> list[np.ndarray | Exception]:
        return await self._run(self._infer_rows, rows)

    def _infer_rows(self, rows: list[StepRow]) -> list[np.ndarray | Exception]:
        """Check each row (a bad one fails alone, before any cache exists for it), then run the
        good ones; a request with two rows here has them run in turn."""
        outcomes: list[np.ndarray | Exception | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        while todo:
            firsts: dict[str, int] = {}  # each request's first row still to run
            for i in todo:
                firsts.setdefault(rows[i].request_id, i)
            wave = list(firsts.values())
            todo = [i for i in todo if i not in wave]
            ready = []
            for i in wave:
                try:
                    ready.append((i, self._checked_cache(rows[i])))
                except Exception as exc:  # noqa: BLE001 - reported to that row's caller
                    outcomes[i] = exc
            if ready:
                for (i, _), out in zip(ready, self._forward_rows([(rows[i], cache) for i, cache in ready])):
                    outcomes[i] = out
        return outcomes  # type: ignore[return-value]

    def _checked_cache(self, row: StepRow) -> C:
        """The row's cache once its input is known good (refused inputs create none)."""
        x = row.x
        if row.shard is not None and row.shard != self.shard:  # cannot happen while `_holding` holds
            raise RuntimeError(f"a row for {row.shard} reached a pass of {self.shard}")
        if self.shard.is_first_layer():
            if x.ndim != 2:
                raise ValueError(f"first shard expects token ids (1, T), got shape {x.shape}")
        elif x.ndim != 3:
            raise ValueError(f"shard expects hidden states (1, T, D), got shape {x.shape}")
        if x.shape[0] != 1:
            raise ValueError(f"the {self.name} engine runs batch size 1, got shape {x.shape}")
        check_context(self.model.max_context, self._caches.offset(row.request_id), x.shape[1])
        return self._caches.get_or_create(row.request_id, self._make_cache)

    # -- caches ---------------------------------------------------------------------------------
    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        self._caches.set_policy(capacity, is_live)

    def cache_offset(self, request_id: str) -> int:
        return self._caches.offset(request_id)

    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        self._caches.trim(request_id, n_tokens)

    def free_cache(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        # A forward still queued for this request (its caller was cancelled and abandoned
        # it) would create the cache again; dropping it once more on the worker thread,
        # after that call, frees it for good. A closed engine runs no forward any more.
        if not self._closed:
            self._executor.submit(self._caches.pop, request_id, None)

    def close(self) -> None:
        """Refuse further calls, release the model and every cache once the queued calls have
        run, and stop the thread if it is the engine's own. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            released = self._executor.submit(self._release)
        except RuntimeError:
            # Interpreter exit: `concurrent.futures` has already joined every worker thread,
            # so nothing can touch the model any more and releasing here is safe.
            self._release()
        else:
            released.result()
        if self.worker_scope == "engine":
            self._executor.shutdown(wait=True)

    def _release(self) -> None:
        self._caches.clear()
        self.model = None
        self.shard = None

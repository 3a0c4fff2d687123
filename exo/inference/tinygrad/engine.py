"""tinygrad implementation of the engine interface, a drop-in twin of the MLX engine.

Same contract as `exo.inference.mlx.engine.MLXInferenceEngine`: one worker thread owns the
model and every KV cache (tinygrad is not thread-safe), a bounded table of per-request caches
that never evicts a live request, `trim_cache` exact or raising, `last_positions` limiting the logits a last shard returns.
The cache is preallocated per request and rolled back by moving its position pointer.

tinygrad compiles each kernel shape once (seconds on a CPU); `ensure_shard` runs a warm-up
request through the decode and short-verify shapes so that cost is paid at load time, not
inside the decode loop. Compiled kernels persist in `~/.cache/tinygrad`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import anyio
import numpy as np

from exo.inference.cache_table import DEFAULT_CAPACITY, CacheTable
from exo.inference.engine import LAST_POSITIONS, InferenceEngine, check_context
from exo.inference.shard import Shard
from exo.inference.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from exo.inference.tinygrad.model import ShardedTinyModel

log = logging.getLogger("exo.tinygrad")
T = TypeVar("T")

DEFAULT_MAX_CONTEXT = int(os.environ.get("EXO_TINYGRAD_MAX_CONTEXT", "4096"))
# Input lengths compiled at load time: decode (1) and the verify blocks of speculation
# (K+1 rows for K up to the default max speculation depth 8, so up to the 16-row bucket).
DEFAULT_WARMUP = tuple(int(n) for n in os.environ.get("EXO_TINYGRAD_WARMUP", "1,2,4,8,16").split(",") if n)


_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _shared_worker() -> ThreadPoolExecutor:
    """The process's one tinygrad thread (started on first use, lives until exit)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-tinygrad")
        return _worker


class RequestCache:
    """One request's preallocated keys/values per layer plus the number of valid positions."""

    def __init__(self, tensors: list[Any]):
        self.tensors = tensors
        self.offset = 0


class TinygradInferenceEngine(InferenceEngine):
    name = "tinygrad"

    def __init__(self, model_dir_for: Callable[[str], Path] | None = None, *, device: str | None = None,
                 dtype: str = os.environ.get("EXO_TINYGRAD_DTYPE", "float32"), max_caches: int = DEFAULT_CAPACITY,
                 max_context: int = DEFAULT_MAX_CONTEXT, use_jit: bool = True,
                 warmup: tuple[int, ...] = DEFAULT_WARMUP):
        """`model_dir_for(model_id)` returns a local model directory, fetching it if needed;
        `device` is a tinygrad device name (default: tinygrad's default, CPU here)."""
        if model_dir_for is None:
            from exo.inference.sources import model_dir_for as default_resolver
            model_dir_for = default_resolver
        self.model_dir_for = model_dir_for
        self._device, self._dtype, self._max_context = device, dtype, max_context
        self._use_jit, self._warmup = use_jit, tuple(warmup)
        self._executor = _shared_worker()
        self._closed = False
        self._load_lock = anyio.Lock()
        self._caches: CacheTable[RequestCache] = CacheTable(max_caches)
        self.model: ShardedTinyModel | None = None
        self.shard: Shard | None = None
        self.tokenizer: Any = None
        self.model_dir: Path | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the tinygrad thread without blocking the event loop."""
        if self._closed:
            raise RuntimeError("tinygrad engine is closed")
        future: Future[T] = self._executor.submit(fn, *args)
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def ensure_shard(self, shard: Shard) -> None:
        async with self._load_lock:
            if self.shard == shard:
                return
            model_dir = await anyio.to_thread.run_sync(self.model_dir_for, shard.model_id)
            await self._run(self._load, shard, model_dir)

    async def context_length(self, model_id: str) -> int | None:
        """The model's window, capped by this engine's KV cache size."""
        declared = await super().context_length(model_id)
        return min(declared, self._max_context) if declared is not None else self._max_context

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        async with self._load_lock:
            await self._run(self._load, shard, Path(path))

    def _load(self, shard: Shard, model_dir: Path) -> None:
        from exo.inference.tinygrad.model import ShardedTinyModel

        started = time.perf_counter()
        config = json.loads((model_dir / "config.json").read_text())
        model = ShardedTinyModel(config, shard, self._max_context, device=self._device, dtype=self._dtype,
                                 use_jit=self._use_jit)
        model.load(model_dir)
        tokenizer = load_tokenizer(model_dir)
        loaded = time.perf_counter()
        self._warm_up(model)
        self.tokenizer = tokenizer
        self.model, self.shard, self.model_dir = model, shard, model_dir
        self._caches.clear()
        log.info("loaded %s layers %d-%d from %s on %s (%.1f s, warm-up %.1f s)", shard.model_id,
                 shard.start_layer, shard.end_layer, model_dir, model.device, loaded - started,
                 time.perf_counter() - loaded)

    def _warm_up(self, model: "ShardedTinyModel") -> None:
        """Compile (and JIT-capture: two calls each) the decode and short multi-token shapes."""
        cache = model.make_cache()
        width = model.config.hidden_size
        for length in self._warmup:
            if length > model.max_context:
                continue
            for _ in range(2 if self._use_jit else 1):
                x = (np.zeros((1, length), dtype=np.int64) if model.shard.is_first_layer()
                     else np.zeros((1, length, width), dtype=np.float32))
                model.forward(x, cache, 0, None)

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        await self.ensure_shard(shard)
        last = (inference_state or {}).get(LAST_POSITIONS)
        return await self._run(self._forward, request_id, np.asarray(input_data), last), inference_state

    def _forward(self, request_id: str, input_data: np.ndarray, last_positions: int | None) -> np.ndarray:
        assert self.model is not None
        if self.shard.is_first_layer():
            if input_data.ndim != 2:
                raise ValueError(f"first shard expects token ids (1, T), got shape {input_data.shape}")
        elif input_data.ndim != 3:
            raise ValueError(f"shard expects hidden states (1, T, D), got shape {input_data.shape}")
        if input_data.shape[0] != 1:
            raise ValueError(f"the tinygrad engine runs batch size 1, got shape {input_data.shape}")
        check_context(self.model.max_context, self.cache_offset(request_id), input_data.shape[1])
        cache = self._cache(request_id)
        out = self.model.forward(input_data, cache.tensors, cache.offset, last_positions)
        cache.offset += input_data.shape[1]
        return out

    def _cache(self, request_id: str) -> RequestCache:
        return self._caches.get_or_create(request_id, lambda: RequestCache(self.model.make_cache()))

    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        self._caches.set_policy(capacity, is_live)

    def cache_offset(self, request_id: str) -> int:
        cache = self._caches.get(request_id)
        return cache.offset if cache else 0

    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        if n_tokens == 0:
            return
        cache = self._caches.get(request_id)
        held = cache.offset if cache else 0
        if n_tokens < 0 or n_tokens > held:
            raise ValueError(f"cannot trim {n_tokens} tokens from request {request_id!r} holding {held}")
        # Positions past the pointer are never read before they are written again.
        cache.offset = held - n_tokens

    def free_cache(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        # A forward still queued for this request (its caller was cancelled and abandoned
        # it) would create the cache again; dropping it once more on the worker thread,
        # after that call, frees it for good.
        self._executor.submit(self._caches.pop, request_id, None)

    def close(self) -> None:
        """Refuse further calls and drop every cache once queued work has finished; the
        shared thread stays for other engines (it is a daemon-free pool joined at exit)."""
        self._closed = True
        self._executor.submit(self._release).result()

    def _release(self) -> None:
        self._caches.clear()
        self.model = None
        self.shard = None

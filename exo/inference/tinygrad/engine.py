"""tinygrad implementation of the engine interface, a drop-in twin of the MLX engine.

The worker thread, loading, input checks and the per-request cache table come from
`ThreadedEngine`; every tinygrad engine of a process shares one thread (tinygrad is not
thread-safe). What is tinygrad's: building and loading `ShardedTinyModel`, the forward pass,
and a request's cache, preallocated per request and rolled back by moving its position
pointer.

tinygrad compiles each kernel shape once (seconds on a CPU); loading runs a warm-up request
through the decode and short-verify shapes so that cost is paid at load time, not inside the
decode loop. Compiled kernels persist in `~/.cache/tinygrad`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from exo.inference.cache_table import DEFAULT_CAPACITY
from exo.inference.head_rows import HeadRows
from exo.inference.shard import Shard
from exo.inference.threaded import ThreadedEngine

if TYPE_CHECKING:
    from exo.inference.tinygrad.model import ShardedTinyModel

log = logging.getLogger("exo.tinygrad")

DEFAULT_MAX_CONTEXT = int(os.environ.get("EXO_TINYGRAD_MAX_CONTEXT", "4096"))
# Input lengths compiled at load time: decode (1) and the verify blocks of speculation
# (K+1 rows for K up to the default max speculation depth 8, so up to the 16-row bucket).
DEFAULT_WARMUP = tuple(int(n) for n in os.environ.get("EXO_TINYGRAD_WARMUP", "1,2,4,8,16").split(",") if n)


class RequestCache:
    """One request's preallocated keys/values per layer plus the number of valid positions."""

    def __init__(self, tensors: list[Any]):
        self.tensors = tensors
        self.offset = 0

    def trim(self, n_tokens: int) -> None:
        # Positions past the pointer are never read before they are written again.
        self.offset -= n_tokens


class TinygradInferenceEngine(ThreadedEngine[RequestCache]):
    name = "tinygrad"
    worker_scope = "process"
    model: ShardedTinyModel | None

    def __init__(self, model_dir_for: Callable[[str], Path] | None = None, *, device: str | None = None,
                 dtype: str = os.environ.get("EXO_TINYGRAD_DTYPE", "float32"), max_caches: int = DEFAULT_CAPACITY,
                 max_context: int = DEFAULT_MAX_CONTEXT, use_jit: bool = True,
                 warmup: tuple[int, ...] = DEFAULT_WARMUP):
        """`device` is a tinygrad device name (default: tinygrad's default, CPU here)."""
        super().__init__(model_dir_for, max_caches=max_caches)
        self._device, self._dtype, self._max_context = device, dtype, max_context
        self._use_jit, self._warmup = use_jit, tuple(warmup)

    async def context_length(self, model_id: str) -> int | None:
        """The model's window, capped by this engine's KV cache size."""
        declared = await super().context_length(model_id)
        return min(declared, self._max_context) if declared is not None else self._max_context

    def _load_model(self, shard: Shard, model_dir: Path) -> ShardedTinyModel:
        from exo.inference.tinygrad.model import ShardedTinyModel

        started = time.perf_counter()
        config = json.loads((model_dir / "config.json").read_text())
        model = ShardedTinyModel(config, shard, self._max_context, device=self._device, dtype=self._dtype,
                                 use_jit=self._use_jit)
        model.load(model_dir)
        loaded = time.perf_counter()
        self._warm_up(model)
        log.info("loaded %s layers %d-%d from %s on %s (%.1f s, warm-up %.1f s)", shard.model_id,
                 shard.start_layer, shard.end_layer, model_dir, model.device, loaded - started,
                 time.perf_counter() - loaded)
        return model

    def _warm_up(self, model: ShardedTinyModel) -> None:
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

    def _make_cache(self) -> RequestCache:
        return RequestCache(self.model.make_cache())

    def _forward(self, x: np.ndarray, cache: RequestCache, last_positions: int | None,
                 head_rows: HeadRows | None) -> np.ndarray:
        out = self.model.forward(x, cache.tensors, cache.offset, last_positions)
        cache.offset += x.shape[1]
        # The jitted head computes every row; a restricted head is exact here but saves nothing.
        return head_rows.select(out) if head_rows is not None else out

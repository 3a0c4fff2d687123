"""MLX implementation of the engine interface.

All MLX work for one engine runs on one dedicated worker thread (anyio `to_thread` with a
capacity-1 limiter would still hop between pool threads, and MLX streams are per thread),
so the event loop never blocks and KV caches are only ever touched by one thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import weakref
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import anyio
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from exo.inference.cache_table import DEFAULT_CAPACITY, CacheTable
from exo.inference.engine import LAST_POSITIONS, InferenceEngine, check_context, context_of
from exo.inference.mlx.sharded_model import ShardedModel
from exo.inference.shard import Shard
from exo.inference.tokenizer import load_tokenizer

log = logging.getLogger("exo.mlx")
T = TypeVar("T")

# On x86/ARM CPUs float32 decodes faster than float16/bfloat16 (no native half GEMM).
DEFAULT_DTYPE = "float32" if sys.platform != "darwin" else None


_live_engines: "weakref.WeakSet[MLXInferenceEngine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """MLX aborts the process if it exits with an engine thread still alive."""
    for engine in list(_live_engines):
        engine.close()


class MLXInferenceEngine(InferenceEngine):
    name = "mlx"

    def __init__(self, model_dir_for: Callable[[str], Path] | None = None, *,
                 dtype: str | None = os.environ.get("EXO_DTYPE", DEFAULT_DTYPE),
                 max_caches: int = DEFAULT_CAPACITY):
        """`model_dir_for(model_id)` returns a local model directory, fetching it if needed."""
        if model_dir_for is None:
            from exo.inference.sources import model_dir_for as default_resolver
            model_dir_for = default_resolver
        self.model_dir_for = model_dir_for
        self._dtype = getattr(mx, dtype) if dtype else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-mlx")
        self._load_lock = anyio.Lock()
        self._caches: CacheTable[list[KVCache]] = CacheTable(max_caches)
        self.model: ShardedModel | None = None
        self.shard: Shard | None = None
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self.max_context: int | None = None  # from the loaded model's config
        _live_engines.add(self)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the engine's MLX thread without blocking the event loop."""
        future: Future[T] = self._executor.submit(fn, *args)
        # Waiting happens in anyio's pool; on cancellation the MLX call finishes and is dropped.
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def ensure_shard(self, shard: Shard) -> None:
        async with self._load_lock:
            if self.shard == shard:
                return
            model_dir = await anyio.to_thread.run_sync(self.model_dir_for, shard.model_id)
            await self._run(self._load, shard, model_dir)

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        async with self._load_lock:
            await self._run(self._load, shard, Path(path))

    def _load(self, shard: Shard, model_dir: Path) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        model = ShardedModel(config, shard)
        weights: dict[str, mx.array] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
        for file in files:
            weights.update(mx.load(str(file)))
        weights = model.select_weights(weights)
        quantization = config.get("quantization")
        if quantization:
            nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                        class_predicate=lambda path, _: f"{path}.scales" in weights)
        if self._dtype is not None:
            weights = {k: v.astype(self._dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                       for k, v in weights.items()}
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        self.tokenizer = load_tokenizer(model_dir)
        self.model, self.shard, self.model_dir = model, shard, model_dir
        self.max_context = context_of(config)
        self._caches.clear()
        log.info("loaded %s layers %d-%d from %s", shard.model_id, shard.start_layer, shard.end_layer, model_dir)

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        await self.ensure_shard(shard)
        last = (inference_state or {}).get(LAST_POSITIONS)
        return await self._run(self._forward, request_id, np.asarray(input_data), last), inference_state

    def _forward(self, request_id: str, input_data: np.ndarray, last_positions: int | None) -> np.ndarray:
        assert self.model is not None
        if input_data.ndim >= 2:  # before any MLX array or cache exists for this input
            check_context(self.max_context, self.cache_offset(request_id), input_data.shape[1])
        if self.shard.is_first_layer():
            if input_data.ndim != 2:
                raise ValueError(f"first shard expects token ids (1, T), got shape {input_data.shape}")
            x = mx.array(input_data.astype(np.int32))
        else:
            if input_data.ndim != 3:
                raise ValueError(f"shard expects hidden states (1, T, D), got shape {input_data.shape}")
            x = mx.array(input_data, dtype=self._dtype or mx.float32)
        out = self.model(x, self._cache(request_id), last_positions)
        mx.eval(out)
        return np.array(out.astype(mx.float32), copy=False)

    def _cache(self, request_id: str) -> list[KVCache]:
        return self._caches.get_or_create(request_id, self.model.make_cache)

    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        self._caches.set_policy(capacity, is_live)

    def cache_offset(self, request_id: str) -> int:
        cache = self._caches.get(request_id)
        return cache[0].offset if cache else 0

    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        if n_tokens == 0:
            return
        cache = self._caches.get(request_id)
        held = cache[0].offset if cache else 0
        if n_tokens < 0 or n_tokens > held:
            raise ValueError(f"cannot trim {n_tokens} tokens from request {request_id!r} holding {held}")
        for layer_cache in cache:
            if not layer_cache.is_trimmable() or layer_cache.trim(n_tokens) != n_tokens:
                raise RuntimeError(f"KV cache of request {request_id!r} could not be trimmed exactly")

    def free_cache(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        # A forward still queued for this request (its caller was cancelled and abandoned
        # it) would create the cache again; dropping it once more on the MLX thread, after
        # that call, frees it for good.
        try:
            self._executor.submit(self._caches.pop, request_id, None)
        except RuntimeError:
            pass  # engine closed: no forward can run any more, nothing to recreate

    def close(self) -> None:
        """Stop the MLX thread; the process must not exit while it is alive (MLX aborts)."""
        self._caches.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

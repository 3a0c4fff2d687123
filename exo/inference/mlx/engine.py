"""MLX implementation of the engine interface.

The worker thread, loading, input checks and the per-request cache table come from
`ThreadedEngine`; each engine has a thread of its own (MLX streams are per thread). What is
MLX's: loading safetensors weights (optionally quantized, cast to `dtype`), the forward
pass, and a request's cache as mlx_lm `KVCache`s, one per layer.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import weakref
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from exo.inference.cache_table import DEFAULT_CAPACITY
from exo.inference.head_rows import HeadRows
from exo.blas import row_exact_rows
from exo.inference.mlx.packed import exact_groups
from exo.inference.mlx.sharded_model import ShardedModel
from exo.inference.shard import Shard
from exo.inference.threaded import StepRow, ThreadedEngine

log = logging.getLogger("exo.mlx")

# On x86/ARM CPUs float32 decodes faster than float16/bfloat16 (no native half GEMM).
DEFAULT_DTYPE = "float32" if sys.platform != "darwin" else None


_live_engines: "weakref.WeakSet[MLXInferenceEngine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """MLX aborts the process if it exits with an engine thread still alive."""
    for engine in list(_live_engines):
        engine.close()


class LayerCaches:
    """One request's mlx_lm KV caches, one per layer; they all hold the same positions."""

    def __init__(self, layers: list[KVCache]):
        self.layers = layers

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def trim(self, n_tokens: int) -> None:
        for layer in self.layers:
            if not layer.is_trimmable() or layer.trim(n_tokens) != n_tokens:
                raise RuntimeError(f"an MLX KV cache could not drop exactly {n_tokens} tokens")


class MLXInferenceEngine(ThreadedEngine[LayerCaches]):
    name = "mlx"
    worker_scope = "engine"
    model: ShardedModel | None

    def __init__(self, model_dir_for: Callable[[str], Path] | None = None, *,
                 dtype: str | None = os.environ.get("EXO_DTYPE", DEFAULT_DTYPE),
                 max_caches: int = DEFAULT_CAPACITY):
        super().__init__(model_dir_for, max_caches=max_caches)
        self._dtype = getattr(mx, dtype) if dtype else None
        # The last restricted head asked for and its gathered weight (a draft uses one subset).
        self._head_cache: tuple[HeadRows, mx.array, mx.array | None] | None = None  # rows, their ids, weight
        self._exact_rows = row_exact_rows()
        self.batcher.budget = self._exact_rows  # a pass is one exact group (see packed.exact_groups)
        _live_engines.add(self)

    def _load_model(self, shard: Shard, model_dir: Path) -> ShardedModel:
        self._head_cache = None  # gathered from the weights being replaced
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
        log.info("loaded %s layers %d-%d from %s", shard.model_id, shard.start_layer, shard.end_layer, model_dir)
        return model

    def _head_for(self, rows: HeadRows) -> tuple[mx.array, mx.array | None]:
        """The rows' token ids and gathered head weight (None: a quantized head), kept for the next call."""
        if self._head_cache is None or self._head_cache[0] != rows:
            ids = mx.array(rows.ids().astype(np.int32))
            self._head_cache = (rows, ids, self.model.head_weight(ids))
        return self._head_cache[1], self._head_cache[2]

    def _release(self) -> None:
        super()._release()
        self._head_cache = None

    def _make_cache(self) -> LayerCaches:
        return LayerCaches(self.model.make_cache())

    def _forward(self, x: np.ndarray, cache: LayerCaches, last_positions: int | None,
                 head_rows: HeadRows | None) -> np.ndarray:
        return self._forward_rows([(StepRow("", x, last_positions, head_rows), cache)])[0]

    def _forward_rows(self, rows: list[tuple[StepRow, LayerCaches]]) -> list[np.ndarray]:
        """The rows in packed passes (`ShardedModel.packed`), each in its own cache, grouped so
        that each row computes exactly what it would alone (`packed.exact_groups`)."""
        inputs = [mx.array(row.x.astype(np.int32)) if self.shard.is_first_layer()
                  else mx.array(row.x, dtype=self._dtype or mx.float32) for row, _ in rows]
        heads = [self._head_for(head) if (head := self._head(row)) is not None else (None, None) for row, _ in rows]
        outs: list[mx.array | None] = [None] * len(rows)
        for group in exact_groups([row.positions for row, _ in rows], self._exact_rows):
            packed = self.model.packed([inputs[i] for i in group], [rows[i][1].layers for i in group],
                                       [rows[i][0].last_positions for i in group], [heads[i][1] for i in group])
            for i, out in zip(group, packed):
                ids, weight = heads[i]
                # A quantized head gives every column: keep the row's own.
                outs[i] = mx.take(out, ids, axis=-1) if ids is not None and weight is None else out
        mx.eval(outs)
        return [np.array(out.astype(mx.float32), copy=False) for out in outs]

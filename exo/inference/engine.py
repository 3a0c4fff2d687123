"""The engine interface every backend implements (upstream Exo gen-1 compatible).

Arrays cross this boundary as numpy: token ids `(1, T)` int on a first shard, hidden
states `(1, T, D)` on any other, logits `(1, T, V)` out of a last shard (every position, so
a speculative verify can read all of them).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np

from exo.inference.sampling import sample_last
from exo.inference.shard import Shard

__all__ = ["InferenceEngine", "Shard", "LAST_POSITIONS", "HEAD_ROWS", "PASS", "last_only", "ContextLengthError", "check_context",
           "context_of"]

# `inference_state` key: the last shard returns logits for only this many final positions
# (a prefill needs one row; a K-token verify needs K+1). Absent = every position.
LAST_POSITIONS = "last_positions"
# `inference_state` key: the last shard returns logits for only these vocabulary rows (an
# `exo.inference.head_rows.HeadRows`, in its order), a draft model's restricted head. Absent = all.
HEAD_ROWS = "head_rows"
# Returned state key: the pass a call ran in (an `exo.inference.batching.PassRecord`: rows,
# input positions over all of them, seconds), from engines that batch requests' calls.
PASS = "pass"


def last_only(n: int = 1) -> dict:
    return {LAST_POSITIONS: n}


class ContextLengthError(ValueError):
    """An input would run past the model's context window: refused before anything is allocated
    (past it a model computes garbage, and MLX can run out of memory or crash the process)."""

    def __init__(self, limit: int, held: int, new: int):
        super().__init__(f"context overflow: {held} cached + {new} new tokens exceed the model's "
                         f"maximum context length of {limit} tokens")
        self.limit, self.held, self.new = limit, held, new


def check_context(limit: int | None, held: int, new: int) -> None:
    """Raise ContextLengthError unless `held + new` positions fit in `limit` (None: no limit known)."""
    if limit is not None and held + new > limit:
        raise ContextLengthError(limit, held, new)


def context_of(config: dict) -> int | None:
    """The context window a Hugging Face config declares (None if it declares none)."""
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


class InferenceEngine(ABC):
    """One engine instance holds one model shard; KV caches live per request id.

    The contract every engine keeps (stated here once):

    - Per-request offsets: each request id has its own KV cache. `cache_offset` is the number
      of positions it holds (0 for a request never seen, or freed); `infer_tensor` runs its
      input at that offset and advances it by the input's length. A refused input (wrong
      shape, batch size other than 1, past the context) leaves the offset unchanged.
    - Trim exact or raise: `trim_cache(rid, n)` drops exactly the last `n` positions, or
      raises (ValueError for `n < 0` or more than the cache holds, before anything changes);
      `n == 0` does nothing.
    - Free is idempotent: `free_cache` forgets the request's cache; freeing a request twice,
      or one never seen, does nothing, and a forward of it that was still queued does not
      bring the cache back.
    - Thread confinement: model calls run off the event loop on the engine's own worker
      (a thread or a process), one at a time; `cache_offset`, `trim_cache` and `free_cache`
      are quick synchronous calls made between a request's forwards, never during one.
    - `close` releases the worker; a closed engine is not used again (the in-process engines
      refuse every further model call with RuntimeError).
    """

    name: str = ""  # backend name as `--inference-engine` spells it
    shard: Shard | None = None
    tokenizer: Any = None
    model_dir_for: Callable[[str], Path]  # model id -> local HF-layout directory (fetching it)

    async def full_shard(self, model_id: str) -> Shard:
        """The whole-model shard of `model_id` (fetched if needed; layer count from its config)."""
        model_dir = await anyio.to_thread.run_sync(self.model_dir_for, model_id)
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        return Shard.full(model_id, layers)

    async def context_length(self, model_id: str) -> int | None:
        """How many positions (prompt + generated) this engine accepts for `model_id`."""
        model_dir = await anyio.to_thread.run_sync(self.model_dir_for, model_id)
        return context_of(json.loads((model_dir / "config.json").read_text()))

    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        await self.ensure_shard(shard)
        return np.asarray(self.tokenizer.encode(prompt, add_special_tokens=False), dtype=np.int64)

    async def decode(self, shard: Shard, tokens: np.ndarray | list[int]) -> str:
        await self.ensure_shard(shard)
        return self.tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)])

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """Sample one token from the last position of logits `x` (..., V)."""
        return np.asarray([sample_last(x, temp, top_p=top_p, rng=rng)], dtype=np.int64)

    @abstractmethod
    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        """Run `input_data` through the shard at the request's current cache offset."""

    async def infer_prompt(self, request_id: str, shard: Shard, prompt: str,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        tokens = await self.encode(shard, prompt)
        return await self.infer_tensor(request_id, shard, tokens.reshape(1, -1), inference_state)

    @abstractmethod
    async def ensure_shard(self, shard: Shard) -> None:
        """Load `shard` (fetching weights if needed) unless it is already loaded."""

    @abstractmethod
    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        """Replace the loaded weights with those in `path`."""

    @abstractmethod
    def cache_offset(self, request_id: str) -> int:
        """Tokens held in the request's KV cache (0 if it has none)."""

    @abstractmethod
    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        """Drop the request's last `n_tokens` positions (exactly, or raise)."""

    @abstractmethod
    def free_cache(self, request_id: str) -> None:
        """Forget the request's KV cache."""

    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        """Hold caches for at most `capacity` requests and never evict a live one (`is_live`,
        read from the engine's worker thread, says which are; without it all are): the node
        sizes this from its admission limit. Engines without a bounded table ignore it."""

    def set_max_batch(self, max_batch: int) -> None:
        """Run at most `max_batch` requests' calls in one pass (1: each call alone). Engines
        that do not batch ignore it."""

    def batch_stats(self) -> dict | None:
        """Passes run, rows that shared one, the largest, the bound and the requests holding a
        cache now (None: no batching here)."""
        return None

    def close(self) -> None:
        """Release worker threads; call before the process exits."""

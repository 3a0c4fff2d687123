"""The worker-thread engine base: the engine contract on a minimal numpy backend (no model)."""

import threading
from pathlib import Path

import anyio
import numpy as np
import pytest

from exo.inference.cache_table import CacheTableFull
from exo.inference.engine import ContextLengthError
from exo.inference.shard import Shard
from exo.inference.threaded import ThreadedEngine
from tests.helpers.tiny_models import write_byte_tokenizer

SHARD = Shard.full("toy", 1)


class ToyModel:
    max_context = 8


class ToyCache:
    def __init__(self) -> None:
        self.offset = 0

    def trim(self, n_tokens: int) -> None:
        self.offset -= n_tokens


class ToyEngine(ThreadedEngine[ToyCache]):
    """Returns, for each input position, the position it ran at; records the threads it ran on."""

    name = "toy"
    worker_scope = "engine"

    def __init__(self, model_dir: Path, **kwargs):
        super().__init__(lambda _model_id: model_dir, **kwargs)
        self.threads: set[str] = set()

    def _load_model(self, shard: Shard, model_dir: Path) -> ToyModel:
        self.threads.add(threading.current_thread().name)
        return ToyModel()

    def _make_cache(self) -> ToyCache:
        return ToyCache()

    def _forward(self, x: np.ndarray, cache: ToyCache, last_positions: int | None, head_rows) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        out = np.arange(cache.offset, cache.offset + x.shape[1])[None]
        cache.offset += x.shape[1]
        return out


class SharedToyEngine(ToyEngine):
    worker_scope = "process"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    write_byte_tokenizer(tmp_path)
    return tmp_path


@pytest.fixture
def engine(model_dir):
    engine = ToyEngine(model_dir)
    yield engine
    engine.close()


def tokens(n: int) -> np.ndarray:
    return np.zeros((1, n), dtype=np.int64)


async def test_offsets_are_per_request_and_calls_run_on_the_worker(engine):
    out, _ = await engine.infer_tensor("a", SHARD, tokens(3))
    assert out.tolist() == [[0, 1, 2]]
    out, _ = await engine.infer_tensor("a", SHARD, tokens(2))
    assert out.tolist() == [[3, 4]]
    await engine.infer_tensor("b", SHARD, tokens(1))
    assert (engine.cache_offset("a"), engine.cache_offset("b"), engine.cache_offset("c")) == (5, 1, 0)
    [thread] = engine.threads  # loading and every forward ran on the one worker
    assert thread.startswith("exo-toy")


async def test_trim_is_exact_or_raises(engine):
    await engine.infer_tensor("r", SHARD, tokens(5))
    engine.trim_cache("r", 0)
    for bad in (6, -1):
        with pytest.raises(ValueError, match="cannot trim"):
            engine.trim_cache("r", bad)
    assert engine.cache_offset("r") == 5  # a refused trim changes nothing
    with pytest.raises(ValueError, match="cannot trim"):
        engine.trim_cache("never-seen", 1)
    engine.trim_cache("r", 2)
    out, _ = await engine.infer_tensor("r", SHARD, tokens(1))
    assert out.tolist() == [[3]]


async def test_bad_inputs_are_refused_before_any_cache_exists(engine):
    for bad, match in ((np.zeros((2, 3), dtype=np.int64), "batch size 1"),
                       (np.zeros((1, 3, 4), dtype=np.float32), "token ids"),
                       (tokens(9), "context overflow")):
        with pytest.raises(ValueError, match=match):
            await engine.infer_tensor("r", SHARD, bad)
    assert "r" not in engine._caches
    await engine.infer_tensor("r", SHARD, tokens(6))
    with pytest.raises(ContextLengthError):
        await engine.infer_tensor("r", SHARD, tokens(3))
    assert engine.cache_offset("r") == 6


async def test_free_is_idempotent_and_beats_a_queued_forward(engine):
    await engine.infer_tensor("r", SHARD, tokens(2))
    engine.free_cache("r")
    engine.free_cache("r")
    engine.free_cache("never-seen")
    assert engine.cache_offset("r") == 0

    gate = threading.Event()
    engine._executor.submit(gate.wait)  # hold the worker so the next forward stays queued
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.infer_tensor, "q", SHARD, tokens(2))
        await anyio.sleep(0.05)
        engine.free_cache("q")
        gate.set()
    assert "q" not in engine._caches and engine.cache_offset("q") == 0


async def test_the_table_bound_drops_only_finished_requests(model_dir):
    engine = ToyEngine(model_dir, max_caches=2)
    try:
        await engine.infer_tensor("a", SHARD, tokens(1))
        await engine.infer_tensor("b", SHARD, tokens(1))
        with pytest.raises(CacheTableFull):  # every cache counts as live without a predicate
            await engine.infer_tensor("c", SHARD, tokens(1))
        assert "c" not in engine._caches
        engine.set_cache_policy(2, is_live=lambda rid: rid != "a")
        await engine.infer_tensor("c", SHARD, tokens(1))
        assert set(engine._caches) == {"b", "c"} and engine._caches.evicted == 1
    finally:
        engine.close()


async def test_a_closed_engine_refuses_calls(model_dir):
    engine = ToyEngine(model_dir)
    await engine.infer_tensor("r", SHARD, tokens(2))
    engine.close()
    engine.close()  # closing twice does nothing
    assert engine.model is None and engine.cache_offset("r") == 0
    with pytest.raises(RuntimeError, match="toy engine is closed"):
        await engine.infer_tensor("r", SHARD, tokens(1))
    with pytest.raises(RuntimeError, match="closed"):
        await engine.ensure_shard(SHARD)
    engine.free_cache("r")  # still idempotent


async def test_a_process_worker_is_shared_and_outlives_a_closed_engine(model_dir):
    first, second = SharedToyEngine(model_dir), SharedToyEngine(model_dir)
    try:
        assert first._executor is second._executor
        await first.infer_tensor("r", SHARD, tokens(1))
        first.close()
        out, _ = await second.infer_tensor("r", SHARD, tokens(2))
        assert out.tolist() == [[0, 1]]
    finally:
        second.close()


class MarkedToyEngine(ToyEngine):
    """Each pass sleeps a little and answers with the model it ran on: which weights computed a row."""

    def _load_model(self, shard: Shard, model_dir: Path) -> ToyModel:
        model = ToyModel()
        model.name = shard.model_id
        return model

    def _forward(self, x, cache, last_positions, head_rows):
        import time

        time.sleep(0.1)
        cache.offset += x.shape[1]
        return np.full((1, x.shape[1]), ord(self.model.name[0]))


async def test_a_reload_waits_for_the_calls_in_flight_and_a_pass_never_mixes_shards(model_dir):
    """A call made for model A, waiting behind another pass, when model B is asked for: it still
    runs with A's weights (once it ran with B's and came back as A's), then B loads."""
    engine = MarkedToyEngine(model_dir)
    a, b = Shard.full("A", 1), Shard.full("B", 1)
    outputs: dict[str, int] = {}
    try:
        await engine.ensure_shard(a)

        async def call(rid: str, shard: Shard) -> None:
            out, _ = await engine.infer_tensor(rid, shard, tokens(1))
            outputs[rid] = chr(int(out[0, 0]))

        async with anyio.create_task_group() as group:
            group.start_soon(call, "first", a)  # runs at once
            await anyio.sleep(0.02)
            group.start_soon(call, "second", a)  # waits for the next pass
            await anyio.sleep(0.02)
            group.start_soon(engine.ensure_shard, b)  # a reload asked for meanwhile
            await anyio.sleep(0.02)
            group.start_soon(call, "third", b)
        assert outputs == {"first": "A", "second": "A", "third": "B"}
        assert engine.shard == b
    finally:
        engine.close()

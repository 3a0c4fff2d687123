"""Pipelined speculation: rollback correctness, cancellation, errors, process placement."""

import asyncio
import threading

import anyio
import numpy as np
import pytest

from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.process_engine import EngineProcessError, ProcessInferenceEngine
from tests.helpers.decoding import collect, plain_tokens


class CheckedEngine(MLXInferenceEngine):
    """A real engine that re-derives every output from scratch and compares.

    It tracks the tokens each request's cache should hold (appends on forward, drops on
    trim) and checks every forward's last logits against a fresh prefill of that sequence,
    so a cache left at a wrong offset or with stale entries fails immediately.
    """

    def __init__(self):
        super().__init__()
        self.reference = MLXInferenceEngine()
        self.held: dict[str, list[int]] = {}
        self.checks = 0

    async def infer_tensor(self, request_id, shard, input_data, inference_state=None):
        tokens = self.held.setdefault(request_id, [])
        tokens += np.asarray(input_data).reshape(-1).tolist()
        out, state = await super().infer_tensor(request_id, shard, input_data, inference_state)
        assert self.cache_offset(request_id) == len(tokens)
        fresh, _ = await self.reference.infer_tensor("fresh", shard, np.asarray([tokens]))
        self.reference.free_cache("fresh")
        np.testing.assert_allclose(out[0, -1], fresh[0, -1], rtol=1e-4, atol=1e-4)
        self.checks += 1
        return out, state

    def trim_cache(self, request_id, n_tokens):
        super().trim_cache(request_id, n_tokens)
        del self.held[request_id][len(self.held[request_id]) - n_tokens:]

    def free_cache(self, request_id):
        super().free_cache(request_id)
        self.held.pop(request_id, None)

    def close(self):
        super().close()
        self.reference.close()


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_forced_rejections_keep_both_caches_exact(make_speculative, tiny_llama, tiny_llama_other, pipelined,
                                                        temperature):
    target, draft = CheckedEngine(), CheckedEngine()
    engine = make_speculative(tiny_llama_other, target=target, draft=draft, draft_tokens=3,
                              adaptive_speculation=False, acceptance_threshold=0, pipelined=pipelined)
    shard = await engine.full_shard(str(tiny_llama))
    params = GenerationParams(max_tokens=30, temperature=temperature, seed=4)
    got = await collect(engine.generate(shard, [3, 1, 4, 1, 5], params, eos_ids=frozenset()))
    assert len(got) == 30
    metrics = engine.get_metrics()
    assert metrics["drafted_tokens"] > metrics["accepted_tokens"]  # there were rejections
    assert draft.checks > 10 and target.checks > 5
    if temperature == 0:
        assert got == await plain_tokens(tiny_llama, [3, 1, 4, 1, 5], params)


async def test_cancelling_mid_request_leaks_nothing(make_speculative, tiny_llama, tiny_llama_other):
    engine = make_speculative(tiny_llama_other, pipelined=True)
    shard = await engine.full_shard(str(tiny_llama))
    params = GenerationParams(max_tokens=200, temperature=0.0)
    await collect(engine.generate(shard, [1, 2], GenerationParams(max_tokens=3), eos_ids=frozenset()))  # warm
    tasks_before = len(asyncio.all_tasks())
    threads_before = threading.active_count()
    received = []
    with anyio.move_on_after(10):
        async with engine.generate(shard, [9, 8, 7], params, request_id="doomed", eos_ids=frozenset()) as stream:
            async for block in stream:
                received += block.tokens
                if len(received) >= 5:
                    break  # the client went away
    await anyio.sleep(0.2)
    assert len(received) >= 5
    assert len(asyncio.all_tasks()) == tasks_before
    assert threading.active_count() <= threads_before + 1  # anyio's idle worker may linger
    assert engine.target.cache_offset("doomed") == 0 and engine.draft.cache_offset("doomed") == 0
    again = await collect(engine.generate(shard, [9, 8, 7], GenerationParams(max_tokens=12), eos_ids=frozenset()))
    assert again == await plain_tokens(tiny_llama, [9, 8, 7], GenerationParams(max_tokens=12))


class BrokenTarget(MLXInferenceEngine):
    def __init__(self):
        super().__init__()
        self.fail = False

    async def infer_tensor(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("target device lost")
        return await super().infer_tensor(*args, **kwargs)


@pytest.mark.parametrize("pipelined", [False, True])
async def test_target_failure_is_one_clear_error_and_engine_recovers(make_speculative, tiny_llama, pipelined):
    target = BrokenTarget()
    engine = make_speculative(tiny_llama, target=target, pipelined=pipelined)
    shard = await engine.full_shard(str(tiny_llama))
    with pytest.raises(RuntimeError, match="target device lost"):
        async with engine.generate(shard, [1, 2, 3], GenerationParams(max_tokens=40), eos_ids=frozenset()) as stream:
            async for _ in stream:
                target.fail = True
    target.fail = False
    got = await collect(engine.generate(shard, [1, 2, 3], GenerationParams(max_tokens=10), eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [1, 2, 3], GenerationParams(max_tokens=10))


@pytest.mark.integration
async def test_draft_and_target_in_pinned_processes(make_speculative, tiny_llama, tiny_llama_other):
    target = ProcessInferenceEngine(cpus=[0])
    draft = ProcessInferenceEngine(cpus=[1] if len(__import__("os").sched_getaffinity(0)) > 1 else [0])
    engine = make_speculative(tiny_llama_other, target=target, draft=draft, pipelined=True, draft_tokens=3)
    shard = await engine.full_shard(str(tiny_llama))
    params = GenerationParams(max_tokens=20)
    got = await collect(engine.generate(shard, [5, 5, 5], params, eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [5, 5, 5], params)
    with pytest.raises(EngineProcessError, match="died"):
        async with engine.generate(shard, [5, 5, 5], params, eos_ids=frozenset()) as stream:
            async for _ in stream:
                target._process.kill()  # the target's machine goes away mid-request
    # The next request starts a fresh engine process and is served correctly.
    assert await collect(engine.generate(shard, [5, 5, 5], params, eos_ids=frozenset())) == got

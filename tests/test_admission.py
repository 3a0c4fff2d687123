"""Admission instead of eviction: the gate, the engines' cache tables, the node and the API."""

import json
import threading
import time
from contextlib import AsyncExitStack

import anyio
import httpx
import numpy as np
import pytest

from tools.local_ring import free_port
from exo.inference.cache_table import CacheTable, CacheTableFull
from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.shard import Shard
from exo.networking.peer_info import PeerInfo
from exo.orchestration.admission import (QUEUE_FULL, QUEUE_TIMEOUT, AdmissionGate, AdmissionRejected,
                                         kv_bytes_per_token, max_live_from_memory)
from exo.orchestration.cluster import Cluster
from exo.orchestration.node import Node
from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api


# -- the gate ---------------------------------------------------------------------------------
async def _wait_until(predicate, timeout=5.0):
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_gate_admits_in_arrival_order_and_hands_slots_on():
    gate = AdmissionGate(max_live=2, max_queued=10, queue_timeout_s=30)
    order: list[str] = []

    async def request(name: str, hold: anyio.Event) -> None:
        async with gate.admit(name):
            order.append(name)
            assert len(gate.live) <= 2
            await hold.wait()

    holds = {name: anyio.Event() for name in "abcdef"}
    async with anyio.create_task_group() as group:
        for name in "abcdef":
            group.start_soon(request, name, holds[name])
            await _wait_until(lambda n="abcdef".index(name) + 1: len(gate.live) + gate.queued == n)
        assert order == ["a", "b"] and gate.queued == 4
        for name in "badcfe":  # finish out of order: the waiters still go in arrival order
            holds[name].set()
            await anyio.sleep(0.01)
    assert order == list("abcdef")
    assert gate.live == [] and gate.queued == 0 and gate.admitted == 6


async def test_gate_refuses_when_the_queue_is_full():
    gate = AdmissionGate(max_live=1, max_queued=1, queue_timeout_s=30)
    await gate.acquire("running")
    async with anyio.create_task_group() as group:
        group.start_soon(gate.acquire, "waiting")
        await _wait_until(lambda: gate.queued == 1)
        with pytest.raises(AdmissionRejected) as refused:
            await gate.acquire("third")
        assert refused.value.reason == QUEUE_FULL and refused.value.retry_after_s >= 1
        gate.release("running")
    assert gate.live == ["waiting"] and gate.queued == 0


async def test_gate_wait_times_out_and_leaves_the_queue():
    gate = AdmissionGate(max_live=1, max_queued=4, queue_timeout_s=0.2)
    await gate.acquire("running")
    with pytest.raises(AdmissionRejected) as refused:
        await gate.acquire("late")
    assert refused.value.reason == QUEUE_TIMEOUT and "0.2 s" in str(refused.value)
    assert gate.queued == 0 and gate.live == ["running"]
    gate.release("running")
    await gate.acquire("next")  # nothing was lost: the freed slot is free
    assert gate.live == ["next"]


async def test_cancelled_waiter_leaves_cleanly_without_losing_a_slot():
    gate = AdmissionGate(max_live=1, max_queued=4, queue_timeout_s=30)
    await gate.acquire("running")
    with anyio.move_on_after(0.1):
        await gate.acquire("impatient")
    assert gate.queued == 0 and gate.live == ["running"]

    # Cancelled and handed a slot in the same instant: the slot is not leaked.
    async def request(name: str) -> None:
        async with gate.admit(name):
            await anyio.sleep_forever()

    async with anyio.create_task_group() as group:
        group.start_soon(request, "cancelled-then-granted")
        await _wait_until(lambda: gate.queued == 1)
        group.cancel_scope.cancel()  # the waiter is cancelled ...
        gate.release("running")  # ... and granted before it runs again
    assert gate.live == [] and gate.queued == 0
    await gate.acquire("after")
    assert gate.live == ["after"]


async def test_raising_the_limit_admits_waiters():
    gate = AdmissionGate(max_live=1, max_queued=4, queue_timeout_s=30)
    await gate.acquire("a")
    async with anyio.create_task_group() as group:
        group.start_soon(gate.acquire, "b")
        group.start_soon(gate.acquire, "c")
        await _wait_until(lambda: gate.queued == 2)
        gate.resize(3)
    assert sorted(gate.live) == ["a", "b", "c"]


def test_default_limit_from_memory():
    qwen_15b = {"num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 1536}
    assert kv_bytes_per_token(qwen_15b) == 2 * 28 * 2 * 128 * 4
    per_request = 2 * kv_bytes_per_token(qwen_15b) * 4096  # target + as much again, 4096 tokens
    assert max_live_from_memory(qwen_15b, 4096, 10 * per_request) == 5  # half the free memory
    assert max_live_from_memory(qwen_15b, 4096, per_request) == 1  # the floor
    assert max_live_from_memory(qwen_15b, 4096, 0) == 1
    assert max_live_from_memory(qwen_15b, 4096, 10_000 * per_request) == 64  # the ceiling


# -- the cache table ------------------------------------------------------------------------------
def test_cache_table_never_evicts_a_live_request():
    live = {"a", "b"}
    table: CacheTable[str] = CacheTable(2, is_live=live.__contains__)
    table.get_or_create("a", lambda: "cache a")
    table.get_or_create("b", lambda: "cache b")
    made = []
    with pytest.raises(CacheTableFull, match="2 live requests"):
        table.get_or_create("c", lambda: made.append("c"))
    assert made == [] and table.get("a") == "cache a" and table.get("b") == "cache b"
    live.discard("a")  # finished, but its cache was never freed: that one may go
    assert table.get_or_create("c", lambda: "cache c") == "cache c"
    assert "a" not in table and table.get("b") == "cache b" and table.evicted == 1


async def test_engine_refuses_a_request_beyond_its_table_and_keeps_the_others(tiny_llama):
    engine = MLXInferenceEngine(max_caches=2)
    try:
        shard = Shard(str(tiny_llama), 0, 3, 4)
        await engine.ensure_shard(shard)
        for rid, length in (("a", 5), ("b", 7)):
            await engine.infer_tensor(rid, shard, np.arange(1, length + 1).reshape(1, -1))
        with pytest.raises(CacheTableFull):
            await engine.infer_tensor("c", shard, np.asarray([[1, 2, 3]]))
        assert engine.cache_offset("a") == 5 and engine.cache_offset("b") == 7 and engine.cache_offset("c") == 0
        engine.free_cache("a")
        await engine.infer_tensor("c", shard, np.asarray([[1, 2, 3]]))
        assert engine.cache_offset("c") == 3 and engine.cache_offset("b") == 7
    finally:
        engine.close()


# -- the node --------------------------------------------------------------------------------------
def _node(model, draft, limit, **options):
    return Node("n1", lambda: (MLXInferenceEngine(), MLXInferenceEngine()),
                SpeculativeConfig(draft_model=str(draft)), str(model), max_concurrent_requests=limit, **options)


async def _collect(node, prompt, params, config=None, request_id=None):
    out = []
    async with node.generate(None, prompt, params, config, request_id) as blocks:
        async for block in blocks:
            out += block.tokens
    return out


async def test_more_live_requests_than_the_old_table_size_all_keep_their_caches(tiny_llama, tiny_llama_other):
    """20 requests live at once (the engines' tables used to hold 16): none is evicted."""
    node = _node(tiny_llama, tiny_llama_other, 20)
    try:
        params = GenerationParams(max_tokens=24, temperature=0.0)
        spec = SpeculativeConfig(enabled=True, pipelined=True, draft_model=str(tiny_llama_other))
        prompts = [[5 + i, 40 + i, 90 + 2 * i] for i in range(20)]
        solo = [await _collect(node, p, params) for p in prompts]
        peak = {"live": 0, "caches": 0}
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            results[i] = await _collect(node, prompts[i], params, spec if i % 2 else None)

        async def watch() -> None:
            while True:
                peak["live"] = max(peak["live"], len(node.admission.live))
                peak["caches"] = max(peak["caches"], len(node.engine.target._caches))
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            async with anyio.create_task_group() as requests:
                for i in range(20):
                    requests.start_soon(one, i)
            group.cancel_scope.cancel()
        assert [results[i] for i in range(20)] == solo
        assert peak["caches"] > 16  # more live caches than the old 16-entry table held
        assert node.engine.target._caches.capacity == 20 and node.engine.target._caches.evicted == 0
        assert node.counters.requests["completed"] == 40 and not node.counters.rejected
    finally:
        node.close()


async def test_node_queues_past_its_limit_and_lists_live_requests(tiny_llama, tiny_llama_other):
    node = Node("solo", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), SpeculativeConfig(), str(tiny_llama),
                max_concurrent_requests=2,
                cluster=lambda engine, events: Cluster(PeerInfo("solo", "127.0.0.1", free_port()), engine, events,
                                                       discovery=None))
    try:
        params = GenerationParams(max_tokens=8, temperature=0.0)
        held = [AsyncExitStack(), AsyncExitStack()]  # r0 and r1, each left open until closed below
        streams = [await held[i].enter_async_context(node.generate(None, [1, 2, 3 + i], params, request_id=f"r{i}"))
                   for i in range(2)]
        firsts = [(await anext(streams[0])).tokens, (await anext(streams[1])).tokens]
        assert all(firsts)
        assert node.live_requests() == ["r0", "r1"]
        assert node.cluster_metrics()["live_requests"] == ["r0", "r1"]  # a single node lists its own
        third: list[list[int]] = []
        release = anyio.Event()

        async def run_third() -> None:
            async with node.generate(None, [1, 2, 5], params, request_id="r2") as blocks:
                third.append((await anext(blocks)).tokens)
                await release.wait()

        async with anyio.create_task_group() as group:
            group.start_soon(run_third)
            await _wait_until(lambda: node.admission.queued == 1)
            assert not third and node.live_requests() == ["r0", "r1"]
            await held[0].aclose()  # r0 stops early: r2 takes its slot
            await _wait_until(lambda: bool(third))
            assert third and node.live_requests() == ["r1", "r2"]
            await held[1].aclose()
            release.set()
        assert node.live_requests() == [] and node.cluster_metrics()["live_requests"] == []
        assert node.counters.requests["stopped"] == 3
    finally:
        node.close()


async def test_default_limit_is_sized_from_memory_when_the_model_loads(tiny_llama, monkeypatch):
    import exo.orchestration.node as node_module

    per_request = 2 * kv_bytes_per_token(json.loads((tiny_llama / "config.json").read_text())) * 512
    monkeypatch.setattr(node_module, "available_memory", lambda: 6 * per_request)  # half of it: 3 requests
    alone = _node(tiny_llama, tiny_llama, None)
    stage = Node("stage", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), SpeculativeConfig(),
                 str(tiny_llama), cluster=lambda engine, events: Cluster(
                     PeerInfo("stage", "127.0.0.1", free_port()), engine, events, discovery=None))
    try:
        # Before a model is loaded here, a node with a cluster may be another node's ring
        # stage: its table keeps room for what any memory-sized draft node admits.
        assert stage.engine.target._caches.capacity == 64
        for node in (alone, stage):
            await node.shard_for(None)
            assert node.admission.max_live == 3
            assert node.engine.target._caches.capacity == node.engine.draft._caches.capacity == 3
    finally:
        alone.close()
        stage.close()


# -- the API -----------------------------------------------------------------------------------------
def _chat_body(content, max_tokens=12, stream=False, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **extra}


def _streamed_text(url, content, **extra):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat_body(content, stream=True, **extra),
                      timeout=120) as response:
        assert response.status_code == 200
        text = []
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["delta"].get("content") or "")
        return "".join(text)


def test_24_concurrent_streams_with_a_limit_of_8_all_finish_equal_to_solo_runs(tiny_llama, tiny_llama_other):
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, max_concurrent_requests=8, max_queued_requests=32) as (url, node):
        prompts = [f"stream number {i}" for i in range(24)]
        solo = {p: _streamed_text(url, p) for p in prompts}
        results: dict[str, str] = {}
        errors: list[BaseException] = []
        peak = [0]
        done = threading.Event()

        def client(i: int) -> None:
            try:
                results[prompts[i]] = _streamed_text(url, prompts[i], speculative={"enabled": i % 2 == 1,
                                                                                    "pipelined": i % 4 == 1})
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], len(node.admission.live))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        done.set()
        watcher.join()
        assert errors == []
        assert results == solo
        assert 1 <= peak[0] <= 8
        assert node.engine.target._caches.capacity == 8 and node.engine.target._caches.evicted == 0
        # A slot is released after the response's last byte: the client may see [DONE] first.
        _wait_for(lambda: not node.admission.live and node.counters.requests["completed"] == 48)
        assert node.admission.live == [] and node.admission.queued == 0
        assert node.counters.requests["completed"] == 48 and not node.counters.rejected


@pytest.fixture(scope="module")
def busy_api(tiny_llama, tiny_llama_other):
    """One slot, one queue place: the tests hold the slot themselves to make the server busy."""
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, max_concurrent_requests=1, max_queued_requests=1,
                     queue_timeout_s=30) as (url, node):
        yield url, node


def _hold_the_slot(node, name="holder"):
    # With the slot free, acquire completes without waiting; no request is in flight, so
    # touching the gate from this thread is safe (no waiter to wake on the server's loop).
    assert node.admission.live == [] and node.admission.queued == 0
    anyio.run(node.admission.acquire, name)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_is_a_429_with_retry_after_also_for_streams(busy_api):
    url, node = busy_api
    rejected_before = node.counters.rejected[QUEUE_FULL]
    _hold_the_slot(node)
    waiting: list[httpx.Response] = []
    try:
        node.admission.queue_timeout_s = 3.0
        waiter = threading.Thread(target=lambda: waiting.append(
            httpx.post(f"{url}/v1/chat/completions", json=_chat_body("queued"), timeout=30)))
        waiter.start()
        _wait_for(lambda: node.admission.queued == 1)
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", json=_chat_body("one too many", stream=stream),
                                  timeout=30)
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert error["code"] == QUEUE_FULL and error["type"] == "rate_limit_error"
        waiter.join(30)
    finally:
        node.admission.queue_timeout_s = 30
        _wait_for(lambda: node.admission.queued == 0)
        node.admission.release("holder")
    # the queued request waited its 3 s and was refused the same way
    assert waiting[0].status_code == 429 and waiting[0].json()["error"]["code"] == QUEUE_TIMEOUT
    assert int(waiting[0].headers["retry-after"]) >= 1
    assert node.counters.rejected[QUEUE_FULL] == rejected_before + 2
    ok = httpx.post(f"{url}/v1/chat/completions", json=_chat_body("now there is room"), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 12


def test_queued_stream_times_out_with_429_not_200(busy_api):
    url, node = busy_api
    _hold_the_slot(node)
    try:
        node.admission.queue_timeout_s = 0.5
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat_body("patience", stream=True),
                          timeout=30) as response:
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) >= 1
            assert json.loads(response.read())["error"]["code"] == QUEUE_TIMEOUT
    finally:
        node.admission.queue_timeout_s = 30
        node.admission.release("holder")
    assert node.admission.queued == 0


def test_client_leaving_the_queue_frees_its_place(busy_api):
    url, node = busy_api
    _hold_the_slot(node)
    try:
        for stream in (True, False):
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while queued (30 s timeout)
                httpx.post(f"{url}/v1/chat/completions", json=_chat_body("bye", stream=stream),
                           timeout=httpx.Timeout(30, read=0.5))
            _wait_for(lambda: node.admission.queued == 0, timeout=5)
    finally:
        node.admission.release("holder")
    assert node.admission.live == []
    assert httpx.post(f"{url}/v1/chat/completions", json=_chat_body("still fine"), timeout=60).status_code == 200


@pytest.mark.integration
def test_a_draft_node_refusal_reaches_the_client_of_another_node_as_429(tmp_path, tiny_llama, tiny_llama_other):
    """Node 1's API forwards to node 0 (the draft node), whose one slot is taken: 429 + Retry-After."""
    from tools.local_ring import RingCluster

    flags = ("--max-concurrent-requests", "1", "--max-queued-requests", "0", "--link-delay-ms", "20")
    with RingCluster(tmp_path, 2, str(tiny_llama), str(tiny_llama_other), extra=flags) as cluster:
        _wait_for(lambda: len(httpx.get(f"{cluster.api_url(1)}/v1/topology", timeout=10).json()["nodes"]) == 2,
                  timeout=60)
        long: list[httpx.Response] = []
        runner = threading.Thread(target=lambda: long.append(httpx.post(
            f"{cluster.url}/v1/completions", json={"prompt": "slow", "max_tokens": 200, "temperature": 0},
            timeout=300)))
        runner.start()
        try:
            _wait_for(lambda: httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["live_requests"],
                      timeout=60)  # the long request holds node 0's slot (each token: >= 40 ms of links)
            refused = httpx.post(f"{cluster.api_url(1)}/v1/completions", timeout=60,
                                 json={"prompt": "me too", "max_tokens": 4, "temperature": 0})
            assert long == []  # still running: the refusal was for want of a slot
        finally:
            runner.join(300)
        metrics = httpx.get(f"{cluster.api_url(1)}/v1/speculative/metrics", timeout=10).json()
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == QUEUE_FULL and "node0" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert long[0].status_code == 200 and long[0].json()["usage"]["completion_tokens"] > 0
    assert metrics["live_requests"] == []

"""Several blocks of a request in flight on a ring: epochs, dropped and discarded blocks.

The first tests drive one ring stage in this process (a real engine; the next stage is a
recorder of what would be sent to it) so the order of arrivals is exact. The last ones run
rings of real node processes on loopback with windows of 1 to 4 blocks.
"""

from __future__ import annotations

import anyio
import httpx
import numpy as np
import pytest

from tools.local_ring import RingCluster
from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.orchestration import protocol
from exo.orchestration.ring_stage import RingStage
from exo.speculative.events import EventBus, KVRollback
from exo.speculative.pipeline.window import Window, allowed_window, window_cap
from exo.topology.partitioning import Stage
from tests.test_ring import PROMPTS, SAMPLED, assert_same, assert_stages_in_step, complete, single_node_outputs


def test_the_automatic_window_bets_only_on_blocks_likely_to_count():
    assert window_cap(0, 1) == 1 and window_cap(0, 4) == 4 and window_cap(3, 8) == 3
    assert [allowed_window(4, rate, 0.3) for rate in (0.1, 0.3, 0.5, 0.6, 0.9, 1.0)] == [1, 2, 2, 3, 4, 4]
    assert [allowed_window(4, rate, 0.1) for rate in (0.05, 0.1, 0.3, 0.5)] == [1, 2, 2, 4]
    window = Window(cap=4, adaptive=True, sequence=[1, 2])
    for _ in range(10):  # whole blocks accepted: the estimate rises, the window opens
        window.sent([3])
        window.judged(1, diverged=False, committed=window.sequence)
    assert window.allowed() == 4 and window.epoch == 0 and window.sequence == [1, 2, *[3] * 10]
    window.sent([4, 5])
    window.sent([6])
    window.judged(2, diverged=True, committed=[1, 2, 9])  # a rejection ends every bet in flight
    assert (window.epoch, window.in_flight, window.sequence) == (1, 0, [1, 2, 9])
    for _ in range(10):
        window.judged(2, diverged=True, committed=[1, 2, 9])
    assert window.allowed() == 1
    assert Window(cap=3, adaptive=False, sequence=[], full_rate=0.0).allowed() == 3


class FirstStage:
    """Stage 0 of a two-stage ring; the passes it sends on are recorded, not delivered."""

    def __init__(self, model: str):
        self.model = model
        self.sent: list[protocol.Forward] = []
        self.ring = [Stage("s0", 0, 1), Stage("s1", 2, 3)]
        self.stage = RingStage("s0", MLXInferenceEngine(), self.send, EventBus())

    async def send(self, node_id: str, method: str, payload: bytes, timeout_s: float) -> bytes:
        if method == "Forward":
            self.sent.append(protocol.decoder(protocol.Forward).decode(payload))
        return protocol.encode(protocol.Ack())

    def block(self, seq: int, start: int, inputs: list[int], epoch: int) -> protocol.Forward:
        header = protocol.BlockHeader("req", "origin", self.model, 4, self.ring, seq, start, inputs, start + 1,
                                      GenerationParams(), list(inputs[1:]), epoch=epoch)
        return protocol.Forward(header, 0)

    def rollback(self, keep: int, epoch: int) -> None:
        self.stage._apply_rollback(KVRollback(request_id="req", keep_tokens=keep, block=epoch, epoch=epoch))

    @property
    def sent_seqs(self) -> list[int]:
        return [f.header.seq for f in self.sent]


async def test_blocks_of_an_ended_epoch_are_dropped_unseen_or_discarded(tiny_llama):
    first = FirstStage(str(tiny_llama))
    stage, engine = first.stage, first.stage.engine
    async with anyio.create_task_group() as group:
        stage.group = group
        await stage._compute(first.block(0, 0, [1, 2, 3, 4, 5], 0))
        # Two blocks of epoch 0 in flight: each extends the cache speculatively.
        await stage._compute(first.block(1, 5, [6, 7, 8], 0))
        await stage._compute(first.block(2, 8, [9, 10], 0))
        state = stage.states["req"]
        assert engine.cache_offset("req") == 10 and state.forwards == 3
        # Block 1 was rejected after its first draft: epoch 1 keeps 7 tokens.
        first.rollback(7, epoch=1)
        assert engine.cache_offset("req") == 7 and state.epoch == 1
        # Block 3 (epoch 0) reaches the stage after the rollback: dropped, never computed.
        await stage._compute(first.block(3, 10, [11], 0))
        assert state.forwards == 3 and state.dropped == 1 and first.sent_seqs == [0, 1, 2]
        # A block of epoch 2 arrives before epoch 2's rollback: it waits, then runs on the trimmed cache.
        late = anyio.Event()

        async def run_epoch_2() -> None:
            await stage._compute(first.block(5, 8, [20, 21], 2))
            late.set()

        group.start_soon(run_epoch_2)
        await stage._compute(first.block(4, 7, [12, 13, 14], 1))  # epoch 1's first block: runs
        await anyio.sleep(0.05)
        assert not late.is_set() and engine.cache_offset("req") == 10
        first.rollback(8, epoch=2)
        with anyio.fail_after(5):
            await late.wait()
        assert engine.cache_offset("req") == 10 and first.sent_seqs == [0, 1, 2, 4, 5]
        # A rollback that arrives while a block runs waits for it; the block is then discarded
        # (its output goes nowhere) and the cache trimmed past it.
        group.start_soon(stage._compute, first.block(6, 10, list(range(30, 60)), 2))
        with anyio.fail_after(5):
            while not state.running:
                await anyio.sleep(0)
        first.rollback(9, epoch=3)
        assert state.epoch == 2 and state.early  # held while the pass runs
        with anyio.fail_after(5):
            while state.running or state.early:
                await anyio.sleep(0.01)
        assert state.epoch == 3 and engine.cache_offset("req") == 9
        assert state.discarded == 1 and state.discarded_seconds > 0 and 6 not in first.sent_seqs
        assert (stage.dropped, stage.discarded) == (1, 1)
        group.cancel_scope.cancel()
    engine.close()


async def test_the_stage_caches_equal_a_single_pass_after_rejections_in_flight(tiny_llama):
    """The trimmed, speculatively extended cache attends exactly like one computed in one go:
    the hidden states stage 0 sends for the last block equal those of a fresh request fed the
    committed tokens."""
    first = FirstStage(str(tiny_llama))
    stage = first.stage
    async with anyio.create_task_group() as group:
        stage.group = group
        await stage._compute(first.block(0, 0, [1, 2, 3, 4, 5], 0))
        await stage._compute(first.block(1, 5, [6, 7, 8], 0))
        await stage._compute(first.block(2, 8, [9, 10], 0))
        first.rollback(6, epoch=1)  # kept 1, 2, 3, 4, 5, 6
        await stage._compute(first.block(3, 6, [40, 41], 1))
        group.cancel_scope.cancel()
    got = first.sent[-1].hidden.array()
    shard = stage.states["req"].shard
    fresh, _ = await stage.engine.infer_tensor("fresh", shard, np.asarray([[1, 2, 3, 4, 5, 6, 40, 41]]))
    np.testing.assert_allclose(got[0], np.asarray(fresh)[0, -2:], rtol=1e-4, atol=1e-4)
    stage.engine.close()


# -- rings of real processes -------------------------------------------------------------------

def windowed(window: int, **extra) -> dict:
    # K = 3 fixed: the tiny draft disagrees with the target on most blocks (forced rejections).
    return {"enabled": True, "pipelined": True, "draft_tokens": 3, "adaptive_speculation": False,
            "ring_window": window, **extra}


@pytest.mark.integration
@pytest.mark.parametrize("nodes", [2, 3])
def test_windows_of_one_to_four_blocks_are_exact_and_keep_every_stage_in_step(tmp_path, tiny_llama,
                                                                              tiny_llama_other, nodes):
    model, draft = str(tiny_llama), str(tiny_llama_other)
    single = single_node_outputs(model, draft, 40)
    names = [f"node{i}" for i in range(nodes)]
    with RingCluster(tmp_path, nodes, model, draft) as cluster:
        ended = 0
        for window in (1, 2, 3, 4):
            for prompt in PROMPTS:
                body = complete(cluster.url, prompt, 40, windowed(window)).json()
                assert_same(body, single[prompt])
                totals = assert_stages_in_step(cluster.url, body["id"], names)
                spec = body["usage"]["speculative"]
                assert spec["drafted_tokens"] > 0 and spec["acceptance_rate"] < 1.0, spec
                ring = httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["recent"][-1]["ring"]
                assert 1 <= ring["max_in_flight"] <= window
                ended += sum(t["dropped"] + t["discarded"] for t in totals.values())
                if window == 1:
                    assert all(t["dropped"] == t["discarded"] == 0 for t in totals.values()), totals
            if window == 4:
                assert ring["max_in_flight"] > 1
        assert ended > 0  # rejections did end epochs with blocks in flight
        # Sampling with the request's seed: reproducible with a window, and (rows travel with
        # the blocks; the judge's stream is the request's) what one node draws.
        sampled = [complete(cluster.url, PROMPTS[0], 40, windowed(3), **SAMPLED).json() for _ in range(2)]
        assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]
        assert sampled[0]["usage"]["speculative"]["drafted_tokens"] > 0
        metrics = httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["cluster"]
        assert metrics["rejected_messages"] == 0


@pytest.mark.integration
def test_every_stage_report_is_in_when_a_request_through_a_jittery_ring_ends(tmp_path, tiny_llama, tiny_llama_other):
    """Three nodes, 0-10 ms of random delay per message, windows 1 and 3: the origin holds every
    stage's final report as soon as the answer is out (once they came in the background, after
    it, and some were missing when the request was reported)."""
    model, draft = str(tiny_llama), str(tiny_llama_other)
    single = single_node_outputs(model, draft, 24)
    names = ["node0", "node1", "node2"]
    with RingCluster(tmp_path, 3, model, draft, extra=("--link-jitter-ms", "10")) as cluster:
        for window in (1, 3):
            for prompt in PROMPTS:
                body = complete(cluster.url, prompt, 24, windowed(window)).json()
                assert_same(body, single[prompt])
                assert_stages_in_step(cluster.url, body["id"], names)
                recent = httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["recent"][-1]
                assert recent["request_id"] == body["id"]
                totals = recent["ring"]["stage_totals"]  # as the origin held them when the request ended
                assert sorted(totals) == names and all(t["final"] for t in totals.values()), totals

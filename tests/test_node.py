"""The node's upstream-style entry points: process_prompt, callbacks, buffers, status."""

import json

import anyio
import msgspec
import numpy as np
import pytest

from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.orchestration.node import Node
from exo.speculative.config import SpeculativeConfig


def make_node(model_dir, draft_dir, **config):
    return Node("n1", lambda: (MLXInferenceEngine(), MLXInferenceEngine()),
                SpeculativeConfig(draft_model=str(draft_dir), **config), str(model_dir), max_generate_tokens=12)


async def test_process_prompt_fires_multi_token_callbacks(tiny_llama):
    node = make_node(tiny_llama, tiny_llama, enabled=True, draft_tokens=3, adaptive_speculation=False,
                     acceptance_threshold=0)
    calls = []
    node.on_token.append(lambda rid, tokens, finished: calls.append((rid, list(tokens), finished)))
    shard = await node.shard_for(None)
    out = await node.process_prompt(shard, "hello", request_id="r1")
    assert len(out) == 12 and [t for _, tokens, _ in calls for t in tokens] == out
    assert any(len(tokens) > 1 for _, tokens, _ in calls)  # several tokens per speculative step
    assert calls[-1][2] is True and all(rid == "r1" for rid, _, _ in calls)
    assert "r1" not in node.buffered_token_output  # buffers are released with the request
    assert node.recent[-1]["request_id"] == "r1" and node.recent[-1]["acceptance_rate"] == 1.0
    node.close()


async def test_process_tensor_and_status(tiny_llama):
    node = make_node(tiny_llama, tiny_llama)
    shard = await node.shard_for(None)
    logits = await node.process_tensor(shard, np.asarray([[1, 2, 3]]), request_id="t")
    assert logits.shape == (1, 3, 320)
    seen = []
    node.on_opaque_status.append(lambda rid, status: seen.append((rid, json.loads(status)["type"])))
    await node.broadcast_opaque_status("t", json.dumps({"type": "kv_rollback", "keep": 2}))
    assert seen == [("t", "kv_rollback")]
    node.close()


async def test_a_slow_reader_of_a_pipelined_request_sees_each_blocks_own_end_and_logprobs(tiny_llama):
    """The pipelined verifier runs ahead of a slow reader; the finish flag and log-probs a
    block arrives with are still that block's, not the request's state by the time it is read."""
    node = make_node(tiny_llama, tiny_llama, enabled=True, pipelined=True, draft_tokens=2,
                     adaptive_speculation=False, acceptance_threshold=0)
    calls = []
    node.on_token.append(lambda rid, tokens, finished: calls.append((list(tokens), finished)))
    params = GenerationParams(max_tokens=16, temperature=0.0, logprobs=0)
    try:
        blocks, state_when_read = [], []
        async with node.generate(None, [3, 1, 4], params, request_id="slow") as stream:
            async for block in stream:
                blocks.append(block)
                await anyio.sleep(0.2)  # the verifier finishes the request long before this loop does
                state_when_read.append(node.engine.requests["slow"].finish_reason)
        assert state_when_read[1] == "length"  # the request had ended while its early blocks were unread
        assert len(blocks) > 2 and any(len(b.tokens) > 1 for b in blocks) and sum(len(b.tokens) for b in blocks) == 16
        assert [b.finish_reason for b in blocks] == [None] * (len(blocks) - 1) + ["length"]
        assert [finished for _, finished in calls] == [False] * (len(calls) - 1) + [True]
        assert all(len(b.logprobs) == len(b.tokens) for b in blocks)
        assert [e.token for b in blocks for e in b.logprobs] == [t for b in blocks for t in b.tokens]
    finally:
        node.close()


async def test_a_long_request_keeps_its_bookkeeping_however_many_newer_requests_finish(tiny_llama):
    """The engine bounds its request table by finished requests only: a request still live
    when more than that many newer ones have come and gone still ends with its outcome and
    metrics (once a KeyError after its last token)."""
    node = make_node(tiny_llama, tiny_llama, enabled=True, draft_tokens=2, adaptive_speculation=False,
                     acceptance_threshold=0)
    try:
        short = GenerationParams(max_tokens=1, temperature=0.0)
        got = []
        async with node.generate(None, [3, 1, 4], GenerationParams(max_tokens=10, temperature=0.0),
                                 request_id="long") as blocks:
            async for block in blocks:
                got += block.tokens
                if len(got) == len(block.tokens):  # after the first block, more short requests than are kept
                    for i in range(260):  # the engine keeps 256 finished
                        async with node.generate(None, [5, i + 1], short, request_id=f"short-{i}") as others:
                            async for _ in others:
                                pass
        assert len(got) == 10
        assert node.outcome("long").finish_reason == "length" and node.recent[-1]["request_id"] == "long"
        assert len(node.engine.requests) == 256 and "short-3" not in node.engine.requests
        assert node.counters.requests["completed"] == 261
        assert not node.counters.requests["failed"]
    finally:
        node.close()


async def test_a_draft_swap_waits_for_the_requests_using_the_draft_in_turn(tiny_llama, tiny_llama_other):
    """A request naming another draft waits until no request uses the loaded one (once it
    swapped the draft at once, clearing every running request's draft cache); a request for
    the loaded draft arriving behind it waits its turn too, so the swap cannot starve."""
    from exo.orchestration.admission import AdmissionRejected

    node = make_node(tiny_llama, tiny_llama, enabled=True, draft_tokens=2, adaptive_speculation=False,
                     acceptance_threshold=0)
    other = msgspec.structs.replace(node.config, draft_model=str(tiny_llama_other))
    loads = []
    load_model = node.engine.draft._load_model
    node.engine.draft._load_model = lambda shard, path: loads.append(shard.model_id) or load_model(shard, path)
    params = GenerationParams(max_tokens=6, temperature=0.0)
    order: list[str] = []
    release_first = anyio.Event()

    async def run(rid: str, config, hold: anyio.Event | None = None) -> list[int]:
        out = []
        async with node.generate(None, [3, 1, 4], params, config, request_id=rid) as blocks:
            async for block in blocks:
                if not out:
                    order.append(rid)
                out += block.tokens
                if hold is not None:
                    await hold.wait()
        return out

    try:
        alone = await run("alone", node.config)
        assert loads == [str(tiny_llama)]
        results = {}

        async def keep(rid, config, hold=None):
            results[rid] = await run(rid, config, hold)

        async with anyio.create_task_group() as group:
            group.start_soon(keep, "first", node.config, release_first)
            await anyio.sleep(0.3)
            group.start_soon(keep, "swap", other)
            await anyio.sleep(0.3)
            group.start_soon(keep, "behind", node.config)
            await anyio.sleep(0.3)
            assert order == ["alone", "first"] and loads == [str(tiny_llama)]  # both wait; nothing swapped
            release_first.set()
        assert order == ["alone", "first", "swap", "behind"]
        assert loads == [str(tiny_llama), str(tiny_llama_other), str(tiny_llama)]
        assert results["first"] == results["swap"] == results["behind"] == alone  # greedy: the target's text

        node.engine.draft_wait_s = 0.2
        hold = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(run, "holder", node.config, hold)
            await anyio.sleep(0.3)
            with pytest.raises(AdmissionRejected, match="cannot be loaded now"):
                await run("impatient", other)
            hold.set()
        assert node.counters.rejected["draft_busy"] == 1
    finally:
        node.close()


async def test_clients_cannot_make_the_node_fetch_a_model(tiny_llama):
    """A card whose weights are not on disk, as target or draft, is refused before any fetch
    unless the operator allows client-triggered downloads; the operator's own models load."""
    from exo.orchestration.node import ModelNotOnDisk
    from exo.speculative.config import ConfigError

    node = make_node(tiny_llama, tiny_llama, enabled=True)
    fetched = []
    node.engine.target.model_dir_for = lambda model_id: fetched.append(model_id) or tiny_llama
    try:
        with pytest.raises(ModelNotOnDisk, match="does not fetch models for clients"):
            await node.shard_for("llama-3.1-70b")
        draft = msgspec.structs.replace(node.config, draft_model="llama-3.2-1b")
        with pytest.raises(ConfigError, match="not on this node's disk"):
            await node.check_draft(str(tiny_llama), draft)
        assert fetched == []
        await node.shard_for(None)  # the operator's default
        node.allow_model_downloads = True
        await node.shard_for("llama-3.1-70b")  # allowed now: the (stubbed) fetch is asked for
        assert "llama-3.1-70b" in fetched
    finally:
        node.close()

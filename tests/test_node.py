"""The node's upstream-style entry points: process_prompt, callbacks, buffers, status."""

import json

import anyio
import numpy as np

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

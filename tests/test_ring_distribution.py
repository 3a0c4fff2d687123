"""Seeded sampling through a real 2-node ring has exactly the target's law.

The ring: node 0 (layer 0, the draft and the scheduler) runs in this process with a real gRPC
server; node 1 (the last layers, which judges every block with the request's seeded RNG) is a
real `exo` subprocess. The draft is a different tiny model, so blocks are often rejected and
the residual distribution matters. Every request is T = 1, top-k 3, K = 2 fixed, seeded with
its index; its first four tokens are compared with their exact law under the target (at
most 81 outcomes, computed from the target's own logits on one in-process engine) by a
G-test. The seeds are fixed, so the statistic is reproducible, and the first 20 seeds give
the texts one node gives (the pipelined drafter draws each block from a stream of its own,
so the blocks it drafts and drops, as timing decides, change nothing).

The broken variant recreates the bug this guards against: the drafter samples from the very
stream the last stage judges with (`draft_rng` / `BlockDraftRngs` monkeypatched to
`judge_rng` in this process, where the drafter runs; the judge, in the subprocess, is untouched). It must fail the same
check, which shows the check can see the bias.
"""

from __future__ import annotations

import math
from collections import Counter

import anyio
import numpy as np
import pytest

from tools.local_ring import RingCluster
from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.sampling import judge_rng, warp
from exo.networking.discovery import ManualDiscovery
from exo.networking.peer_info import PeerInfo
from exo.orchestration.cluster import Cluster
from exo.orchestration.node import Node
from exo.speculative.config import SpeculativeConfig

pytestmark = pytest.mark.integration  # a real 2-node ring, 2,000 requests

N_REQUESTS = 500
LENGTH = 4  # tokens per request whose joint law is tested (the 4th may be a deferred bonus)
PROMPT = "The capital of France is"
PARAMS = dict(max_tokens=LENGTH, temperature=1.0, top_k=3)
CONCURRENT = 8
ALPHA = 1e-4  # an exact sampler fails this with probability 1e-4 (never, at the fixed seeds)


def config(draft: str, pipelined: bool) -> SpeculativeConfig:
    return SpeculativeConfig(enabled=True, draft_model=draft, draft_tokens=2, adaptive_speculation=False,
                             pipelined=pipelined, acceptance_threshold=0.0)


async def exact_law(node: Node, model: str, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(first LENGTH tokens = x) under the target: a tree of warped rows, one forward each."""
    shard = await node.shard_for(model)
    eos = frozenset(node.tokenizer.eos_token_ids)
    law: dict[tuple[int, ...], float] = {}

    async def expand(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == LENGTH or (prefix and prefix[-1] in eos):
            law[prefix] = law.get(prefix, 0.0) + mass
            return
        rid = f"law-{'-'.join(map(str, prefix))}"
        logits, _ = await node.engine.target.infer_tensor(rid, shard, np.asarray([[*prompt, *prefix]]))
        node.engine.target.free_cache(rid)
        probs = warp(np.asarray(logits)[0, -1], PARAMS["temperature"], PARAMS["top_k"])
        for token in np.flatnonzero(probs):
            await expand((*prefix, int(token)), mass * float(probs[token]))

    await expand((), 1.0)
    return law


def g_test(observed: Counter, law: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """(G statistic, p-value); cells expected fewer than 5 times are pooled into one."""
    impossible = [x for x in observed if law.get(x, 0.0) == 0.0]
    assert not impossible, f"outcomes the target never produces: {impossible[:5]}"
    n = sum(observed.values())
    cells, rare_o, rare_e = [], 0, 0.0
    for x, p in law.items():
        if n * p >= 5:
            cells.append((observed.get(x, 0), n * p))
        else:
            rare_o, rare_e = rare_o + observed.get(x, 0), rare_e + n * p
    if rare_e > 0:
        cells.append((rare_o, rare_e))
    g = 2 * sum(o * math.log(o / e) for o, e in cells if o > 0)
    return g, chi2_sf(g, len(cells) - 1)


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with `df` degrees of freedom > x): the regularised upper gamma Q(df/2, x/2)."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for the lower part
        term = total = 1.0 / a
        k = a
        while abs(term) > 1e-15 * abs(total):
            k += 1
            term *= z / k
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # continued fraction for the upper part (Lentz)
    tiny = 1e-300
    b, c, d = z + 1 - a, 1 / tiny, 1 / (z + 1 - a)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


async def ring_samples(workdir, model: str, draft: str, pipelined: bool, seeds: range) -> tuple[dict, dict]:
    """{seed: first tokens} through the ring, and node 0's cluster metrics (+ its recent
    requests) afterwards."""
    ring = RingCluster(workdir, 2, model, draft)  # only node 1 runs as a subprocess
    info = PeerInfo("node0", "127.0.0.1", ring.rpc_ports[0], int(ring.memory_gb[0] * 1e9))
    node = Node("node0", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), config(draft, pipelined), model,
                cluster=lambda engine, events: Cluster(info, engine, events,
                                                       ManualDiscovery(ring.peers_file, "node0"),
                                                       health_interval_s=0.2),
                pass_timeout_s=30)
    outputs: dict[int, tuple[int, ...]] = {}
    try:
        ring.start(1)
        async with anyio.create_task_group() as group:
            await group.start(node.cluster.run)
            with anyio.fail_after(60):
                while "node1" not in node.cluster.peers:
                    assert ring.procs[1].poll() is None, ring.log(1)[-2000:]
                    await anyio.sleep(0.1)
            await node.shard_for(model)
            assert [s.node_id for s in node._ring] == ["node0", "node1"]
            prompt = node.tokenizer.encode(PROMPT)
            limiter = anyio.CapacityLimiter(CONCURRENT)

            async def one(seed: int) -> None:
                async with limiter:
                    tokens: list[int] = []
                    params = GenerationParams(seed=seed, **PARAMS)
                    async with node.generate(model, prompt, params, request_id=f"seed-{seed}") as blocks:
                        async for block in blocks:
                            tokens += block.tokens
                    outputs[seed] = tuple(tokens)

            with anyio.fail_after(600):
                async with anyio.create_task_group() as requests:
                    for seed in seeds:
                        requests.start_soon(one, seed)
            metrics = {**node.cluster_metrics(), "recent": list(node.recent)}
            group.cancel_scope.cancel()
    finally:
        node.close()
        ring.__exit__(None, None, None)
    return outputs, metrics


async def single_node_samples(model: str, draft: str, pipelined: bool, seeds: range) -> dict[int, tuple[int, ...]]:
    node = Node("alone", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), config(draft, pipelined), model)
    try:
        prompt = (await node.shard_for(model)) and node.tokenizer.encode(PROMPT)
        outputs = {}
        for seed in seeds:
            tokens: list[int] = []
            async with node.generate(model, prompt, GenerationParams(seed=seed, **PARAMS)) as blocks:
                async for block in blocks:
                    tokens += block.tokens
            outputs[seed] = tuple(tokens)
        return outputs
    finally:
        node.close()


async def check_law(tmp_path, model: str, draft: str, pipelined: bool) -> tuple[float, float, dict]:
    outputs, metrics = await ring_samples(tmp_path, model, draft, pipelined, range(N_REQUESTS))
    assert sorted(outputs) == list(range(N_REQUESTS))
    assert metrics["rejected_messages"] == 0
    recent = metrics["recent"]  # the scheduler asked for ran, and drafted
    assert recent and all(bool(r["pipeline_busy"]) is pipelined and r["drafted_tokens"] > 0 for r in recent)
    node = Node("law", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), SpeculativeConfig(), model)
    try:
        await node.shard_for(model)
        law = await exact_law(node, model, node.tokenizer.encode(PROMPT))
    finally:
        node.close()
    assert math.isclose(sum(law.values()), 1.0, rel_tol=1e-9) and len(law) > 9
    g, p = g_test(Counter(outputs.values()), law)
    print(f"{'pipelined' if pipelined else 'sequential'}: {len(law)} outcomes, G = {g:.1f}, p = {p:.3g}")
    return g, p, outputs


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
async def test_seeded_ring_sampling_has_the_target_law(tmp_path, tiny_llama, tiny_llama_other, pipelined):
    model, draft = str(tiny_llama), str(tiny_llama_other)
    g, p, outputs = await check_law(tmp_path, model, draft, pipelined)
    assert p > ALPHA, f"G = {g:.1f}, p = {p:.2e}: the ring's seeded samples are not the target's law"
    seeds = range(20)  # the same seed means the same text wherever the target runs
    alone = await single_node_samples(model, draft, pipelined, seeds)
    assert {s: outputs[s] for s in seeds} == alone


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
async def test_a_draft_sharing_the_judges_stream_fails_the_check(tmp_path, tiny_llama, tiny_llama_other,
                                                                 monkeypatch, pipelined):
    import exo.speculative.pipeline.pipelined as pipelined_module
    import exo.speculative.pipeline.sequential as sequential_module

    if pipelined:  # the old bug: draft and judge read one stream
        monkeypatch.setattr(pipelined_module, "BlockDraftRngs", lambda seed: lambda epoch, start, s=judge_rng(seed): s)
    else:
        monkeypatch.setattr(sequential_module, "draft_rng", judge_rng)
    g, p, _ = await check_law(tmp_path, str(tiny_llama), str(tiny_llama_other), pipelined)
    assert p < ALPHA, f"G = {g:.1f}, p = {p:.2e}: the check did not see a biased sampler"


def test_chi_square_tail_matches_known_quantiles():
    for x, df, p in ((3.841459, 1, 0.05), (18.307038, 10, 0.05), (54.051911, 26, 0.001), (0.1, 4, 0.998791)):
        assert math.isclose(chi2_sf(x, df), p, rel_tol=1e-4), (x, df)  # quantiles to 7 digits
    assert math.isclose(chi2_sf(2 * math.log(1e30), 2), 1e-30, rel_tol=1e-6)  # df 2: exactly exp(-x/2)

"""Rings of real node processes on loopback: exact output, exact KV on every stage, faults."""

import json
from concurrent.futures import ThreadPoolExecutor
import signal
import time

import httpx
import pytest

from tools.local_ring import RingCluster
from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api
from tests.helpers.tiny_models import make_slow_twin

pytestmark = pytest.mark.integration  # real node processes on loopback

MODES = {
    "plain": None,
    "sequential": {"enabled": True, "draft_tokens": 4, "adaptive_speculation": False},
    "pipelined": {"enabled": True, "pipelined": True, "draft_tokens": 3, "adaptive_speculation": False},
    # Copies from the request's own text (deterministic drafts: the ring sends no draft rows). A fixed
    # K: adaptive K follows timings, and the pipelined scheduler's on 2 busy cores may pick K = 0.
    "suffix": {"enabled": True, "drafter": "suffix", "pipelined": True, "draft_tokens": 4,
               "adaptive_speculation": False},
}
PROMPTS = ["def fibonacci(n):", "The capital of France is"]


def complete(url: str, prompt: str, max_tokens: int, speculative: dict | None = None, timeout: float = 120,
             **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    if speculative is not None:
        body["speculative"] = speculative
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


SAMPLED = {"temperature": 0.9, "seed": 3}


def single_node_outputs(model: str, draft: str, max_tokens: int) -> dict[str, dict]:
    with running_api(model, SpeculativeConfig(enabled=False, draft_model=draft)) as (url, _):
        outputs = {p: complete(url, p, max_tokens).json() for p in PROMPTS}
        outputs["sampled"] = complete(url, PROMPTS[0], max_tokens, **SAMPLED).json()
        outputs["sampled_sequential"] = complete(url, PROMPTS[0], max_tokens, MODES["sequential"], **SAMPLED).json()
        return outputs


def assert_same(ring: dict, single: dict) -> None:
    assert ring["choices"][0]["text"] == single["choices"][0]["text"]
    assert ring["usage"]["completion_tokens"] == single["usage"]["completion_tokens"]


def cluster_metrics(url: str) -> dict:
    return httpx.get(f"{url}/v1/speculative/metrics", timeout=10).json()["cluster"]


def assert_stages_in_step(url: str, request_id: str, nodes: list[str]) -> dict:
    """Every stage trimmed to the same cache length at every epoch's end; returns each stage's
    final totals for the request.

    Only verdicts that end an epoch send rollbacks (a whole accepted block leaves every cache
    right). The final verdict's rollback may reach a stage after the request was released
    (nothing is left to trim then), so only the last reported block may be missing. Every
    stage's final report comes back with its release, before the request's answer: read once,
    with no wait.
    """
    metrics = cluster_metrics(url)
    totals = metrics["stages"].get(request_id, {})
    assert sorted(totals) == sorted(nodes) and all(t["final"] for t in totals.values()), \
        f"final stage reports incomplete: {totals}"
    offsets = metrics["requests"].get(request_id, {})
    blocks = {node: {int(b): o for b, o in offsets.get(node, {}).items()} for node in nodes}
    every = set().union(*blocks.values())
    for block in sorted(every):
        seen = {node: b[block] for node, b in blocks.items() if block in b}
        assert len(set(seen.values())) == 1, f"block {block}: stages hold {seen}"
        if block != max(every):
            assert len(seen) == len(nodes), f"block {block}'s rollback missing on some stage: {seen}"
    return totals


def test_three_node_ring_is_exact_and_keeps_every_stage_in_step(tmp_path, tiny_llama, tiny_llama_other):
    """A bad draft forces rejections on most blocks; every stage must trim to the same length."""
    model, draft = str(tiny_llama), str(tiny_llama_other)
    single = single_node_outputs(model, draft, 40)
    with RingCluster(tmp_path, 3, model, draft) as cluster:
        ring = httpx.get(f"{cluster.url}/v1/topology", timeout=10).json()
        for mode, speculative in MODES.items():
            for prompt in PROMPTS:
                response = complete(cluster.url, prompt, 40, speculative)
                assert response.status_code == 200, response.text
                body = response.json()
                assert_same(body, single[prompt])
                assert_stages_in_step(cluster.url, body["id"], ["node0", "node1", "node2"])
                if speculative is not None and mode != "suffix":  # a random model's text rarely repeats
                    spec = body["usage"]["speculative"]
                    assert spec["drafted_tokens"] > 0 and spec["acceptance_rate"] < 1.0, (mode, spec)
        # Any node's API serves: node 2 streams the request from the draft node (node 0).
        for mode in ("plain", "pipelined"):
            body = complete(cluster.api_url(2), PROMPTS[0], 40, MODES[mode]).json()
            assert_same(body, single[PROMPTS[0]])
            assert (body["usage"]["speculative"] is None) is (mode == "plain")
        # Sampling happens on the last stage with the request's seed: plain ring decoding draws
        # exactly what one node draws; speculative sampling (draft probabilities sent along) is
        # reproducible with its seed, and draws what one node draws with that seed (the draft's
        # stream and the judge's are the same wherever the judge runs).
        assert_same(complete(cluster.url, PROMPTS[0], 40, **SAMPLED).json(), single["sampled"])
        sampled = [complete(cluster.url, PROMPTS[0], 40, MODES["sequential"], **SAMPLED).json() for _ in range(2)]
        assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]
        assert sampled[0]["usage"]["speculative"]["drafted_tokens"] > 0
        assert_same(sampled[0], single["sampled_sequential"])
        topology = httpx.get(f"{cluster.url}/v1/topology", timeout=10).json()
    assert [s["node_id"] for s in topology["ring"]] == ["node0", "node1", "node2"]
    assert [(s["start_layer"], s["end_layer"]) for s in topology["ring"]] == [(0, 1), (2, 2), (3, 3)]
    assert len(ring["nodes"]) == 3


def test_the_draft_can_run_on_another_node_than_layer_0(tmp_path, tiny_llama, tiny_llama_other):
    model, draft = str(tiny_llama), str(tiny_llama_other)
    single = single_node_outputs(model, draft, 24)
    with RingCluster(tmp_path, 2, model, draft, extra=("--draft-node", "node1")) as cluster:
        body = complete(cluster.url, PROMPTS[0], 24, MODES["sequential"]).json()
        assert_same(body, single[PROMPTS[0]])
        assert body["usage"]["speculative"]["drafted_tokens"] > 0
        served = httpx.get(f"{cluster.api_url(1)}/v1/speculative/metrics", timeout=10).json()["recent"]
        assert [r["request_id"] for r in served] == [body["id"]]  # scheduled (and drafted) on node 1
        assert httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["recent"] == []


@pytest.fixture(scope="module")
def smollm2_ring(tmp_path_factory, smollm2_dir, smollm2_early_exit):
    with RingCluster(tmp_path_factory.mktemp("ring2"), 2, str(smollm2_dir), str(smollm2_early_exit),
                     ring_timeout_s=6) as cluster:
        yield cluster


def test_two_node_ring_with_a_real_model_equals_single_node(smollm2_ring, smollm2_dir, smollm2_early_exit):
    single = single_node_outputs(str(smollm2_dir), str(smollm2_early_exit), 32)
    for mode, speculative in MODES.items():
        for prompt in PROMPTS[:1]:  # the tiny 3-node ring runs every prompt
            body = complete(smollm2_ring.url, prompt, 32, speculative).json()
            assert_same(body, single[prompt])
            if speculative is not None:
                assert body["usage"]["speculative"]["accepted_tokens"] > 0, mode
    metrics = httpx.get(f"{smollm2_ring.url}/v1/speculative/metrics", timeout=10).json()["cluster"]
    assert set(metrics["nodes"]) == {"node0", "node1"}
    assert all(n["forwards"] > 0 and n["forward_seconds"] > 0 for n in metrics["nodes"].values())


# Faults strike with several blocks in flight: pipelined, a window of 3 (K = 2 fixed: short
# blocks, so the faulted stage has more than one of them on its way or queued).
IN_FLIGHT = {"enabled": True, "pipelined": True, "ring_window": 3, "draft_tokens": 2, "adaptive_speculation": False}


def stream_until_error(url: str, after_chunks: int, fault) -> tuple[list[dict], float]:
    """Stream a long generation, call `fault()` after some chunks; returns events and seconds from the fault."""
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0, "stream": True,
            "speculative": IN_FLIGHT}
    events, faulted = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == after_chunks:
                fault()
                faulted = time.monotonic()
    assert faulted is not None, f"the stream ended before the fault: {events}"
    return events, time.monotonic() - faulted


def live_requests(url: str, timeout_s: float = 10) -> list[str]:
    """The requests whose KV a node's stage still holds, once the background releases are in."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = httpx.get(f"{url}/v1/speculative/metrics", timeout=10).json()["cluster"]["live_requests"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


def test_a_stalled_node_fails_the_request_within_the_timeout(smollm2_ring):
    cluster = smollm2_ring
    events, seconds = stream_until_error(cluster.url, 5, lambda: cluster.kill(1, signal.SIGSTOP))
    assert live_requests(cluster.url) == []  # the survivor freed the failed request's caches
    cluster.kill(1, signal.SIGCONT)
    assert "error" in events[-1], events[-1]
    assert "cluster" in events[-1]["error"]["message"]
    assert seconds < cluster.ring_timeout_s + 10
    assert complete(cluster.url, PROMPTS[1], 8).status_code == 200  # the ring serves again


def test_a_killed_node_fails_the_request_and_the_healed_ring_serves(smollm2_ring, smollm2_dir, smollm2_early_exit):
    cluster = smollm2_ring
    events, seconds = stream_until_error(cluster.url, 5, lambda: cluster.kill(1))
    assert "error" in events[-1] and "node1" in events[-1]["error"]["message"], events[-1]
    assert seconds < cluster.ring_timeout_s + 10
    assert live_requests(cluster.url) == []  # the survivor freed the failed request's caches
    cluster.start(1)
    cluster.wait_ring(2)
    single = single_node_outputs(str(smollm2_dir), str(smollm2_early_exit), 16)
    body = complete(cluster.url, PROMPTS[0], 16, MODES["sequential"]).json()
    assert_same(body, {**single[PROMPTS[0]], "usage": {"completion_tokens": 16}})
    assert httpx.get(f"{cluster.url}/v1/topology", timeout=10).json()["ring"][1]["node_id"] == "node1"


JITTERY = {"enabled": True, "pipelined": True, "draft_tokens": 3}  # adaptive K


def test_pipelined_requests_survive_a_jittery_network(tmp_path, tiny_llama):
    """0-5 ms of random delay per message (`--link-jitter-ms 5`) lets messages overtake each
    other. The draft computes the target's own function at several times its cost (a slow
    twin), so adaptive K settles on K = 0 with a probe block every 20 steps; the probe is fully
    accepted and the K = 0 block after it only samples the last stage's held row, skipping
    stage 0. Block n+1's rollback then leaves the last stage right after block n's and could
    reach stage 0 first: the last stage sends them in order and stage 0 applies them in order
    (that buffering is also tested deterministically in test_networking.py). Three requests at
    a time: the stages batch their blocks, and each still equals its single-node run."""
    model, draft = str(tiny_llama), str(make_slow_twin(tiny_llama, tmp_path / "slow-twin", 16))
    prompts = [f"{PROMPTS[i % 2]} {i}" for i in range(30)]
    with running_api(model, SpeculativeConfig(enabled=False, draft_model=draft)) as (url, _):
        single = [complete(url, prompt, 48).json() for prompt in prompts]
    with RingCluster(tmp_path, 2, model, draft, extra=("--link-jitter-ms", "5")) as cluster:
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda p: complete(cluster.url, p, 48, JITTERY), prompts))
        metrics = httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()
    failed = [r.text for r in responses if r.status_code != 200]
    assert failed == [], f"{len(failed)} of {len(prompts)} failed: {failed[:3]}"
    for response, expected in zip(responses, single):
        assert_same(response.json(), expected)
    assert metrics["cluster"]["rejected_messages"] == 0
    assert sum(r["drafted_tokens"] for r in metrics["recent"]) > 0
    assert metrics["batching"]["target"]["batched_rows"] > 0  # stage 0 ran requests' blocks together


def test_a_ring_with_a_cluster_secret_serves_and_refuses_strangers(tmp_path, tiny_llama, tiny_llama_other):
    """The nodes get the secret from EXO_CLUSTER_SECRET; health checks, passes, rollbacks and
    streams between them carry it, and a caller without it (or with a wrong one) is refused."""
    import anyio

    from exo.networking.grpc_transport import LinkOptions, PeerError, PeerHandle
    from exo.networking.peer_info import PeerInfo
    from exo.orchestration import protocol

    model, draft = str(tiny_llama), str(tiny_llama_other)
    single = single_node_outputs(model, draft, 16)
    with RingCluster(tmp_path, 2, model, draft, secret="a long shared secret") as cluster:
        body = complete(cluster.api_url(1), PROMPTS[0], 16, MODES["pipelined"]).json()  # streamed from node 0
        assert_same(body, {**single[PROMPTS[0]], "usage": {"completion_tokens": 16}})
        assert body["usage"]["speculative"]["drafted_tokens"] > 0

        async def knock(secret: str) -> list[str]:
            handle = PeerHandle(PeerInfo("node1", "127.0.0.1", cluster.rpc_ports[1]), LinkOptions(secret=secret))
            errors = []
            try:
                for method in ("Health", "Prepare", "Event"):
                    try:
                        await handle.call(method, protocol.encode(protocol.Ack()), 5)
                    except PeerError as exc:
                        errors.append(str(exc))
                try:
                    async for _ in handle.stream("Generate", b"", 5):
                        pass
                except PeerError as exc:
                    errors.append(str(exc))
                if secret == "a long shared secret":
                    await handle.call("Health", b"", 5)
            finally:
                await handle.close()
            return errors

        for secret in ("", "a wrong secret"):
            errors = anyio.run(knock, secret)
            assert len(errors) == 4 and all("UNAUTHENTICATED" in e for e in errors), errors
        assert not any("UNAUTHENTICATED" in e for e in anyio.run(knock, "a long shared secret"))
        metrics = httpx.get(f"{cluster.api_url(1)}/v1/speculative/metrics", timeout=10).json()["cluster"]
        assert metrics["unauthenticated_calls"] == 8
        assert httpx.get(f"{cluster.url}/v1/speculative/metrics", timeout=10).json()["cluster"][
            "unauthenticated_calls"] == 0  # its peer's calls all carried the secret

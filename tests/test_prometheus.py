"""/metrics: Prometheus text exposition from the node's counters, served for real."""

import math
import time

import anyio
import httpx
import pytest

from exo.api.prometheus import Family, render
from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api
from tests.helpers.prometheus_text import ExpositionError, parse, value

EXPECTED = {
    "exo_node_info": "gauge",
    "exo_requests_total": "counter",
    "exo_requests_rejected_total": "counter",
    "exo_prompt_tokens_total": "counter",
    "exo_generated_tokens_total": "counter",
    "exo_speculative_drafted_tokens_total": "counter",
    "exo_speculative_accepted_tokens_total": "counter",
    "exo_speculative_acceptance_ratio": "gauge",
    "exo_requests_live": "gauge",
    "exo_requests_queued": "gauge",
    "exo_requests_max_live": "gauge",
    "exo_requests_admitted_total": "counter",
    "exo_admission_wait_seconds_total": "counter",
    "exo_ring_passes_total": "counter",
    "exo_ring_pass_seconds_total": "counter",
    "exo_ring_stage_compute_seconds_total": "counter",
}


def test_render_escapes_labels_and_help_and_parses_back():
    tricky = 'a "quoted" back\\slash\nnewline'
    text = render([
        Family("demo_things_total", "counter", "Things.\nSecond line with a \\ too.")
        .add(3, kind=tricky).add(0.25, kind="plain"),
        Family("demo_level", "gauge", "A level.").add(math.inf).add(float("nan"), side="x"),
        Family("demo_empty_total", "counter", "No samples yet."),
    ])
    families = parse(text)
    assert families["demo_things_total"]["type"] == "counter"
    assert families["demo_things_total"]["help"] == "Things.\\nSecond line with a \\\\ too."
    assert value(families, "demo_things_total", kind=tricky) == 3
    assert value(families, "demo_things_total", kind="plain") == 0.25
    assert value(families, "demo_level") == math.inf and math.isnan(value(families, "demo_level", side="x"))
    assert families["demo_empty_total"]["samples"] == {}
    assert 'demo_things_total{kind="plain"} 0.25\n' in text and "demo_level +Inf\n" in text


@pytest.mark.parametrize("bad", [
    'x_total{a="1"} 1',  # no trailing newline
    'x_total{a="1} 1\n',  # unterminated label value
    'x_total{a="\\q"} 1\n',  # unknown escape
    "# TYPE x_total counter\nx_total 1\nx_total 2\n",  # duplicate sample
    "# TYPE x_total counter\nx_total one\n",  # not a number
])
def test_the_reader_rejects_malformed_exposition(bad):
    with pytest.raises(ExpositionError):
        parse(bad)


@pytest.fixture(scope="module")
def api(tiny_llama, tiny_llama_other):
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, max_generate_tokens=64, max_concurrent_requests=3) as (url, node):
        yield url, node


def scrape(url):
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def test_metrics_endpoint_has_the_expected_families_and_they_move(api):
    url, node = api
    before = scrape(url)
    for name, kind in EXPECTED.items():
        assert before[name]["type"] == kind and before[name]["help"], name
    assert value(before, "exo_node_info", node_id=node.id) == 1
    assert value(before, "exo_requests_max_live") == 3
    for reason in ("queue_full", "queue_timeout", "cache_full"):
        assert value(before, "exo_requests_rejected_total", reason=reason) == 0

    usages = []
    for speculative in (False, True):
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "measure me"}], "max_tokens": 10, "temperature": 0,
            "speculative": {"enabled": speculative, "draft_tokens": 3}})
        assert response.status_code == 200
        usages.append(response.json()["usage"])
    after = scrape(url)

    def moved(name, **labels):
        return value(after, name, **labels) - (value(before, name, **labels)
                                                if tuple(sorted(labels.items())) in before[name]["samples"] else 0)

    assert moved("exo_requests_total", status="completed") == 2
    assert moved("exo_requests_total", status="failed") == 0
    assert moved("exo_requests_admitted_total") == 2
    assert moved("exo_generated_tokens_total") == sum(u["completion_tokens"] for u in usages) == 20
    assert moved("exo_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    drafted = moved("exo_speculative_drafted_tokens_total", drafter="model")
    accepted = moved("exo_speculative_accepted_tokens_total", drafter="model")
    assert drafted == usages[1]["speculative"]["drafted_tokens"] > 0
    assert accepted == usages[1]["speculative"]["accepted_tokens"]
    ratio = value(after, "exo_speculative_acceptance_ratio", drafter="model")
    assert ratio == pytest.approx(value(after, "exo_speculative_accepted_tokens_total", drafter="model")
                                  / value(after, "exo_speculative_drafted_tokens_total", drafter="model"))
    assert value(after, "exo_requests_live") == 0 and value(after, "exo_requests_queued") == 0
    assert after["exo_ring_stage_compute_seconds_total"]["samples"] == {}  # no ring: nothing to report


def test_generated_tokens_stop_at_a_stop_string_inside_a_block(api, tiny_llama):
    """A perfect draft verifies blocks of 5 tokens; a stop string cuts one mid-block and the
    rest of it was never generated for anyone: the counter moves by what the response reports."""
    url, _ = api
    speculative = {"enabled": True, "draft_model": str(tiny_llama), "draft_tokens": 4,
                   "adaptive_speculation": False}

    def chat(**extra):
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "stop me"}], "max_tokens": 20, "temperature": 0,
            "speculative": speculative, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    full = chat()["choices"][0]["message"]["content"]
    assert len(full) >= 12
    for cut in range(2, 12, 3):  # cuts at different tokens: some inside a block
        stop = full[cut:cut + 2]
        before = value(scrape(url), "exo_generated_tokens_total")
        body = chat(stop=[stop])
        moved = value(scrape(url), "exo_generated_tokens_total") - before
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["speculative"]["drafted_tokens"] > 0
        assert moved == body["usage"]["completion_tokens"] < 20, stop


def test_rejections_are_counted_by_reason(api):
    url, node = api
    before = value(scrape(url), "exo_requests_rejected_total", reason="queue_full")
    queued = node.admission.max_queued
    node.admission.max_queued = 0
    holders = [f"holder{i}" for i in range(3)]
    try:
        for holder in holders:  # no request in flight: the gate can be filled from this thread
            anyio.run(node.admission.acquire, holder)
        response = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"]
        families = scrape(url)
        assert value(families, "exo_requests_live") == 3
    finally:
        for holder in holders:
            node.admission.release(holder)
        node.admission.max_queued = queued
    assert value(families, "exo_requests_rejected_total", reason="queue_full") == before + 1
    assert value(families, "exo_requests_total", status="rejected") >= 1


@pytest.mark.integration
def test_a_ring_reports_stage_compute_times_and_both_apis_count(tmp_path, tiny_llama, tiny_llama_other):
    """Two real node processes: node 0 drafts and schedules; node 1's API forwards to it."""
    from tools.local_ring import RingCluster

    with RingCluster(tmp_path, 2, str(tiny_llama), str(tiny_llama_other),
                     extra=("--max-concurrent-requests", "4")) as cluster:
        deadline = time.monotonic() + 60  # RingCluster waits for node 0's view only
        while len(httpx.get(f"{cluster.api_url(1)}/v1/topology", timeout=10).json()["nodes"]) < 2:
            assert time.monotonic() < deadline, "node 1 never saw node 0"
            time.sleep(0.1)
        for url in (cluster.url, cluster.api_url(1)):
            response = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "prompt": "ring", "max_tokens": 12, "temperature": 0,
                "speculative": {"enabled": True, "draft_tokens": 3}})
            assert response.status_code == 200, response.text
        scheduler, forwarder = scrape(cluster.url), scrape(cluster.api_url(1))
    assert value(scheduler, "exo_requests_total", status="completed") == 2  # one its own, one forwarded
    assert value(forwarder, "exo_requests_total", status="completed") == 1
    assert value(scheduler, "exo_requests_max_live") == value(forwarder, "exo_requests_max_live") == 4
    assert value(scheduler, "exo_ring_passes_total") > 0 and value(scheduler, "exo_ring_pass_seconds_total") > 0
    assert {labels for labels in scheduler["exo_ring_stage_compute_seconds_total"]["samples"]} == {
        (("stage", "0"),), (("stage", "1"),)}
    assert all(v > 0 for v in scheduler["exo_ring_stage_compute_seconds_total"]["samples"].values())
    assert value(scheduler, "exo_speculative_drafted_tokens_total", drafter="model") > 0
    assert forwarder["exo_ring_stage_compute_seconds_total"]["samples"] == {}  # scheduled elsewhere

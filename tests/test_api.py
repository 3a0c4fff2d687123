"""The ChatGPT-compatible API, served for real and driven by httpx and the openai client."""

import json
import threading
import time

import httpx
import openai
import pytest

from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api


@pytest.fixture(scope="module")
def api(tiny_llama, tiny_llama_other):
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, max_generate_tokens=64) as (url, node):
        yield url, node


def chat(url, content="hello there", **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 20, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def sse_events(response):
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_health_and_models(api):
    url, _ = api
    assert httpx.get(f"{url}/healthcheck", timeout=10).json()["status"] == "ok"
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert "qwen2.5-coder-1.5b" in ids and "smollm2-135m" in ids


def test_greedy_output_same_with_and_without_speculation(api):
    url, node = api
    plain = chat(url).json()
    for overrides in ({"enabled": True}, {"enabled": True, "pipelined": True, "draft_tokens": 2}):
        spec = chat(url, speculative=overrides).json()
        assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert spec["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 20
        assert spec["usage"]["speculative"]["drafted_tokens"] > 0
        assert 0 <= spec["usage"]["speculative"]["acceptance_rate"] <= 1
    assert plain["usage"]["speculative"] is None
    assert plain["choices"][0]["finish_reason"] == "length"
    assert node.config.enabled is False  # the override was for those requests only


def test_a_request_picks_its_drafter_and_the_metrics_say_who_drafted(api):
    url, _ = api
    prompt = "repeat: one two three four, one two three four, one two three four"
    plain = chat(url, prompt, max_tokens=24).json()["choices"][0]["message"]["content"]
    for drafter in ("suffix", "hybrid", "model"):
        body = chat(url, prompt, max_tokens=24, speculative={"enabled": True, "drafter": drafter}).json()
        assert body["choices"][0]["message"]["content"] == plain
    recent = httpx.get(f"{url}/v1/speculative/metrics", timeout=10).json()["recent"][-3:]
    assert "model" not in recent[0]["per_drafter"]  # suffix: no model drafts
    assert "suffix" not in recent[2]["per_drafter"] and recent[2]["per_drafter"]["model"]["blocks"] > 0


def test_streaming_sends_one_chunk_per_token_and_done(api):
    url, _ = api
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "speculative": {"enabled": True, "draft_tokens": 3}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    *chunks, usage = [json.loads(e) for e in events[:-1]]
    token_chunks = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert len(token_chunks) == 12
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == chat(url, "count", max_tokens=12).json()["choices"][0]["message"]["content"]


def test_openai_client_chat_and_completions(api):
    url, _ = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    first = client.chat.completions.create(model=api[1].default_model, max_tokens=10, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
    again = client.chat.completions.create(model=api[1].default_model, max_tokens=10, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"speculative": {"enabled": True}})
    assert first.choices[0].message.content == again.choices[0].message.content
    stream = client.chat.completions.create(model=api[1].default_model, max_tokens=10, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == first.choices[0].message.content
    completion = client.completions.create(model=api[1].default_model, prompt="abc", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5


def test_sampling_parameters_are_honoured(api):
    url, _ = api
    a = chat(url, temperature=1.0, seed=7, max_tokens=15).json()["choices"][0]["message"]["content"]
    b = chat(url, temperature=1.0, seed=7, max_tokens=15).json()["choices"][0]["message"]["content"]
    c = chat(url, temperature=1.0, seed=8, max_tokens=15).json()["choices"][0]["message"]["content"]
    assert a == b and a != c
    greedy = chat(url, max_tokens=15).json()["choices"][0]["message"]["content"]
    assert chat(url, temperature=1.0, top_p=1e-6, seed=3, max_tokens=15).json()["choices"][0]["message"]["content"] == greedy


def test_stop_strings(api):
    url, _ = api
    full = chat(url, max_tokens=20).json()["choices"][0]["message"]["content"]
    stop = full[5:8]
    cut = chat(url, max_tokens=20, stop=[stop]).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-17"}).encode(), 404, "unknown model"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "speculative": {"draft_tokens": 99}}).encode(), 400, "draft_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "speculative": {"bogus": 1}}).encode(), 400, "bogus"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "speculative": {"enabled": True, "drafter": "oracle"}}).encode(), 400, "drafter must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "speculative": {"enabled": True, "draft_model": "deepseek-r1-distill-qwen-7b"},
                 "model": "deepseek-v3"}).encode(), 404, "unknown model"),
])
def test_bad_requests_get_openai_style_4xx(api, body, status, fragment):
    url, _ = api
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_incompatible_draft_is_a_400(api, smollm2_dir):
    url, node = api
    node.models.add("smollm2-local", str(smollm2_dir))  # the operator's --model-dir; clients name models
    response = chat(url, speculative={"enabled": True, "draft_model": "smollm2-local"})
    assert response.status_code == 400
    assert "different tokenizers" in response.json()["error"]["message"]


def test_concurrent_requests_match_sequential(api):
    url, _ = api
    prompts = ["alpha", "bravo", "charlie", "delta"]
    expected = {p: chat(url, p, max_tokens=16).json()["choices"][0]["message"]["content"] for p in prompts}
    results = {}

    def worker(prompt, speculative):
        results[(prompt, speculative)] = chat(url, prompt, max_tokens=16, speculative={
            "enabled": speculative, "pipelined": speculative}).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=worker, args=(p, s)) for p in prompts for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {(p, s): expected[p] for p in prompts for s in (False, True)}


def test_client_disconnect_cancels_generation_and_frees_caches(api):
    url, node = api
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 64, "temperature": 0, "stream": True,
            "speculative": {"enabled": True, "pipelined": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break  # leave mid-stream
    deadline = time.monotonic() + 10

    def busy():
        return node._active or node.engine.target._caches or node.engine.draft._caches

    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node._active == 0
    assert not node.engine.target._caches and not node.engine.draft._caches
    assert chat(url, max_tokens=5).status_code == 200


def test_event_stream_delivers_metrics_updates(api):
    url, _ = api
    seen = []

    def listen():
        with httpx.stream("GET", f"{url}/v1/speculative/events", timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "metrics_update" and len(seen) > 5:
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.3)
    chat(url, max_tokens=20, speculative={"enabled": True})
    listener.join(30)
    kinds = {e["type"] for e in seen}
    assert {"metrics_update", "block_verified", "kv_rollback"} <= kinds
    metrics = httpx.get(f"{url}/v1/speculative/metrics", timeout=10).json()
    assert metrics["totals"]["drafted_tokens"] > 0 and metrics["recent"]
    assert metrics["engines"] == {"target": "mlx", "draft": "mlx"}


def test_every_speculative_setting_can_be_overridden_per_request(api):
    """The API's `speculative` object is the config itself: each field, under its own name,
    is taken (and checked by the config: a wrong type names the field)."""
    url, _ = api
    defaults = SpeculativeConfig()
    for name in SpeculativeConfig.__struct_fields__:
        value = getattr(defaults, name)
        response = chat(url, max_tokens=2, speculative={name: value})
        assert response.status_code == 200, (name, response.text)
    error = chat(url, speculative={"draft_tokens": "four"}).json()["error"]
    assert error["param"] == "speculative" and "speculative.draft_tokens" in error["message"]

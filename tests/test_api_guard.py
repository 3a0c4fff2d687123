"""What the API refuses, and who may use it: against a real server (uvicorn on loopback).

Every refusal is checked for its status and OpenAI-style error body, for happening before
a stream starts, and for leaving the node serving the same greedy text afterwards.
"""

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from exo.api.access import is_loopback, parse_allowed_hosts, warn_if_exposed
from exo.api.limits import Limits, check_depth, Refused
from exo.inference.engine import ContextLengthError
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.tinygrad.engine import TinygradInferenceEngine
from exo.models import ModelRegistry, UnknownModelError
from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api
from tests.helpers.tiny_models import make_tiny_model

LIMITS = Limits(max_body_bytes=256 * 1024, max_json_depth=32, max_prompt_chars=20_000)
CONTEXT = 512  # max_position_embeddings of the tiny test models
KEY = "s3cret-key"
UNICODE_KEY = "clé-🔑"

# -- a tripwire: any open/listdir/scandir under a watched directory is recorded --------------
_WATCHED: list[str] = []
_TOUCHED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event in ("open", "os.listdir", "os.scandir") and _WATCHED and args:
        path = args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if isinstance(path, (str, os.PathLike)) and any(str(path).startswith(w) for w in _WATCHED):
            _TOUCHED.append(f"{event} {path}")


sys.addaudithook(_audit)


def chat(url, content="hello there", headers=None, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, headers=headers)


def text_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")  # never a started stream
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


@pytest.fixture(scope="module")
def served(tiny_llama, tiny_llama_other, tiny_qwen2, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken-draft")
    (broken / "config.json").write_text("{}")  # registered by the operator, but not a loadable model
    registry = ModelRegistry(named={"broken-draft": str(broken), "qwen-draft": str(tiny_qwen2)})
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, api_options={"limits": LIMITS}, max_generate_tokens=32,
                     models=registry) as (url, node):
        yield url, node, text_of(chat(url))


@pytest.fixture
def api(served):
    """The served node, checked afterwards to still answer a normal request with the same text."""
    url, node, baseline = served
    yield url, node
    assert text_of(chat(url)) == baseline


# -- limits -------------------------------------------------------------------------------
def test_prompt_over_the_context_is_refused_with_the_openai_message(api):
    url, _ = api
    for stream in (False, True):
        error = error_of(chat(url, "a" * 600, stream=stream), 400)
        assert f"maximum context length is {CONTEXT} tokens" in error["message"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    response = httpx.post(f"{url}/v1/completions", timeout=30,
                          json={"prompt": "b" * 500, "max_tokens": 20, "temperature": 0})
    error = error_of(response, 400)
    assert "However, you requested 520 tokens (500 in the messages, 20 in the completion)" in error["message"]
    assert error["param"] == "prompt"


def test_max_tokens_beyond_the_context_is_refused(api):
    url, _ = api
    error = error_of(chat(url, max_tokens=10**30), 400)
    assert error["code"] == "context_length_exceeded"
    error = error_of(chat(url, max_completion_tokens=CONTEXT), 400)
    assert error["code"] == "context_length_exceeded"


def test_default_budget_shrinks_to_the_room_left(api):
    url, _ = api
    body = {"messages": [{"role": "user", "content": "c" * 490}], "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    usage, choice = response.json()["usage"], response.json()["choices"][0]
    room = CONTEXT - usage["prompt_tokens"]
    assert 0 < room < 32  # the node's default budget (32) would overflow
    assert usage["completion_tokens"] <= room and usage["total_tokens"] <= CONTEXT
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == room


@pytest.mark.parametrize("pipelined", [False, True])
def test_speculation_never_drafts_past_the_budget(api, pipelined):
    """A request that fills the context exactly: the engines' guards would refuse any block
    that ran past it, so drafting must stop at the budget (and the text stay the plain one)."""
    url, node = api
    content = "h" * (CONTEXT - 17 - 12)  # 17 template tokens around the content, 12 to generate
    failures = node.engine.get_metrics()["draft_failures"]
    spec = chat(url, content, speculative={"enabled": True, "adaptive_speculation": False, "draft_tokens": 8,
                                           "acceptance_threshold": 0.0, "pipelined": pipelined})
    assert spec.json()["usage"]["total_tokens"] == CONTEXT
    assert spec.json()["usage"]["speculative"]["drafted_tokens"] > 0
    assert text_of(spec) == text_of(chat(url, content))
    assert node.engine.get_metrics()["draft_failures"] == failures


def test_openai_client_gets_a_400_for_a_long_prompt(api):
    url, node = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=node.default_model, max_tokens=5,
                                       messages=[{"role": "user", "content": "z" * 2000}])
    assert caught.value.status_code == 400 and caught.value.code == "context_length_exceeded"
    assert "maximum context length" in str(caught.value)


def test_prompt_over_the_character_cap_never_reaches_the_tokenizer(api):
    url, node = api
    calls = []
    original = type(node.tokenizer).encode

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]) if args else None)
        return original(self, *args, **kwargs)

    type(node.tokenizer).encode = counting
    try:
        error = error_of(chat(url, "d" * (LIMITS.max_prompt_chars + 1)), 400)
        completion = httpx.post(f"{url}/v1/completions", timeout=30,
                                json={"prompt": ["e" * 15_000, "f" * 15_000], "max_tokens": 3})
    finally:
        type(node.tokenizer).encode = original
    assert "characters" in error["message"] and error["code"] == "context_length_exceeded"
    assert error_of(completion, 400)["param"] == "prompt"
    assert calls == []


def test_body_over_the_cap_is_a_413(api):
    url, _ = api
    big = json.dumps({"messages": [{"role": "user", "content": "g" * (LIMITS.max_body_bytes + 10)}]}).encode()
    headers = {"content-type": "application/json"}
    declared = httpx.post(f"{url}/v1/chat/completions", content=big, headers=headers, timeout=30)
    assert error_of(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 16384):
            yield big[start:start + 16384]

    streamed = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers=headers, timeout=30)
    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert error_of(streamed, 413)["code"] == "request_too_large"


def test_deep_nesting_is_a_400_not_a_recursion_error(api):
    url, _ = api
    deep = '{"a":' * 1000 + "1" + "}" * 1000
    body = '{"messages": [{"role": "user", "content": "x"}], "unknown": ' + deep + "}"
    response = httpx.post(f"{url}/v1/chat/completions", content=body.encode(), timeout=30,
                          headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["code"] == "nesting_too_deep" and "1001 levels" in error["message"]
    # Brackets inside strings are text, not nesting.
    assert chat(url, "[[[[{{{{" * 40 + '\\"[[[').status_code == 200


def test_depth_scan_ignores_strings_and_escapes():
    check_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[", "b": "\\"[[[[[[[[["}', 2)
    check_depth(b"", 1)
    with pytest.raises(Refused):
        check_depth(b'{"a": [[{"b": "}}}}"}]]}', 3)


@pytest.mark.parametrize("field,value", [
    ("seed", -1), ("seed", 2**64), ("temperature", 100), ("temperature", 2.01), ("temperature", -0.5),
    ("top_p", 0), ("top_p", 1.01), ("max_tokens", 0), ("max_completion_tokens", -3), ("top_k", -1),
])
@pytest.mark.parametrize("stream", [False, True])
def test_numbers_outside_the_openai_ranges_are_400_before_any_stream(api, field, value, stream):
    url, _ = api
    error = error_of(chat(url, **{field: value, "stream": stream}), 400)
    assert error["param"] == field and field in error["message"]


def test_numbers_at_the_edges_of_the_ranges_are_served(api):
    url, _ = api
    for extra in ({"temperature": 2.0, "seed": 0}, {"top_p": 1.0, "seed": 2**64 - 1}, {"max_tokens": 1}):
        assert chat(url, **extra).status_code == 200


def test_draft_tokens_outside_the_depth_is_400_before_the_stream(api):
    url, _ = api
    error = error_of(chat(url, stream=True, speculative={"enabled": True, "draft_tokens": 99}), 400)
    assert "draft_tokens" in error["message"]


def _counting(monkeypatch, tokenizer) -> list[str]:
    """Records every chat template render and tokenization of `tokenizer`'s class."""
    calls: list[str] = []
    kind = type(tokenizer)
    render, encode = kind.chat_prompt, kind.encode

    def counted_render(self, messages):
        calls.append("render")
        return render(self, messages)

    def counted_encode(self, text, *args, **kwargs):
        calls.append("encode")
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(kind, "chat_prompt", counted_render)
    monkeypatch.setattr(kind, "encode", counted_encode)
    return calls


def test_a_chat_is_measured_with_its_template_before_it_is_tokenized(api, monkeypatch):
    url, node = api
    calls = _counting(monkeypatch, node.tokenizer)

    def many(count, content):
        body = {"messages": [{"role": "user", "content": content}] * count, "max_tokens": 2}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

    error = error_of(many(LIMITS.max_messages + 1, ""), 400)  # the default cap, 2048
    assert error["param"] == "messages" and error["code"] == "too_many_messages"
    assert str(LIMITS.max_messages) in error["message"]
    # 19,000 characters of content, 21,000 with 4 per message: refused before the template runs
    error = error_of(many(500, "m" * 38), 400)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    assert calls == []
    # 19,000 with the allowance, but the template renders 22,010 ("user: ...\n" each): never tokenized
    error = error_of(many(1000, "n" * 15), 400)
    assert error["param"] == "messages" and "22010 characters" in error["message"]
    assert calls == ["render"]


@pytest.fixture(scope="module")
def roomy(tiny_llama):
    """A node with the default limits (a 4 MiB body holds 100k messages)."""
    with running_api(str(tiny_llama), SpeculativeConfig(), max_generate_tokens=8) as (url, node):
        yield url, node


def posted_while_checking_health(url: str, **request) -> tuple[httpx.Response, list[float]]:
    """POST a chat completion in a thread while health checks run on the main one: the response,
    and how long each health check waited (the event loop must stay free meanwhile)."""
    answered = {}

    def post() -> None:
        answered["response"] = httpx.post(f"{url}/v1/chat/completions", timeout=120, **request)

    worker = threading.Thread(target=post)
    worker.start()
    waits = []
    while True:
        started = time.monotonic()
        assert httpx.get(f"{url}/healthcheck", timeout=60).status_code == 200
        waits.append(time.monotonic() - started)
        if not worker.is_alive():
            break
        time.sleep(0.01)
    worker.join(120)
    return answered["response"], waits


def test_a_chat_of_100k_empty_messages_is_refused_while_the_node_serves_others(roomy):
    url, _ = roomy
    body = json.dumps({"messages": [{"role": "user", "content": ""}] * 100_000, "max_tokens": 1}).encode()
    assert len(body) < 4 * 1024 * 1024
    response, waits = posted_while_checking_health(url, content=body, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["param"] == "messages" and error["code"] == "too_many_messages"
    assert max(waits) < 1.0, waits  # a generous bound: once the loop stalled for 7.6 s


def test_a_chat_under_the_caps_is_rendered_and_tokenized_off_the_event_loop(roomy):
    url, _ = roomy
    messages = [{"role": "user", "content": f"{i} " + "w" * 400} for i in range(2048)]  # ~830k characters
    response, waits = posted_while_checking_health(url, json={"messages": messages})
    assert error_of(response, 400)["code"] == "context_length_exceeded"  # 512 tokens
    assert max(waits) < 1.0, waits


def test_completions_prompt_lists_and_their_choices_are_capped_before_tokenizing(api, monkeypatch):
    url, node = api
    calls = _counting(monkeypatch, node.tokenizer)

    def complete(prompt, **extra):
        return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra}, timeout=60)

    for prompt in (["p"] * (LIMITS.max_prompts + 1), [[5]] * (LIMITS.max_prompts + 1), ["p"] * 30_000):
        error = error_of(complete(prompt), 400)
        assert error["param"] == "prompt" and error["code"] == "too_many_prompts"
    error = error_of(complete(["a", "b", "c"], n=3), 400)  # 9 generations: over the 8 one response may hold
    assert error["param"] == "n" and "9 generations" in error["message"]
    assert calls == []
    monkeypatch.undo()
    served = complete(["a", "b", "c", "d"], n=2, temperature=0)
    assert served.status_code == 200 and [c["index"] for c in served.json()["choices"]] == list(range(8))
    assert complete([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], temperature=0).status_code == 200  # token ids: one prompt


# -- models are the node's ---------------------------------------------------------------------
@pytest.fixture
def tripwire(tmp_path):
    """A valid model directory nobody registered: a node that resolved client paths would serve it."""
    model = make_tiny_model(tmp_path / "not-registered", "llama", layers=2, seed=3)
    _WATCHED.append(str(tmp_path))
    _TOUCHED.clear()
    yield model
    _WATCHED.remove(str(tmp_path))


def test_a_client_path_is_never_opened_and_unknown_is_unknown(api, tripwire):
    url, node = api
    names = [str(tripwire), str(tripwire / "missing"), str(tripwire / ".." / "not-registered"),
             "~/" + tripwire.name, "../../etc", "gpt-17"]
    bodies = []
    for name in names:
        for stream in (False, True):
            error = error_of(chat(url, model=name, stream=stream), 404)
            assert error["code"] == "model_not_found" and error["param"] == "model"
            bodies.append(re.sub(r"'[^']*'", "NAME", error["message"]))
    assert len(set(bodies)) == 1  # existing and missing paths look exactly alike
    assert str(Path.home()) not in "".join(bodies)
    for name in names[:3]:
        error = error_of(chat(url, speculative={"enabled": True, "draft_model": name}), 404)
        assert error["param"] == "speculative.draft_model"
    assert _TOUCHED == []
    assert node.engine.target.model_dir != tripwire and node.engine.draft.model_dir != tripwire


def test_registry_resolves_names_only():
    registry = ModelRegistry(named={"mine": "/srv/models/mine"}, operator=["/opt/default"])
    assert registry.resolve("mine") == "/srv/models/mine"
    assert registry.resolve("/opt/default") == "/opt/default"
    assert registry.resolve("smollm2-135m") == "smollm2-135m"
    for name in ("/srv/models/mine", "~/mine", "../mine", "/opt/default/"):
        with pytest.raises(UnknownModelError):
            registry.resolve(name)


def test_unusable_requested_draft_is_that_requests_400_only(api):
    url, node = api
    for stream in (False, True):
        error = error_of(chat(url, stream=stream, speculative={"enabled": True, "draft_model": "broken-draft"}), 400)
        assert "broken-draft" in error["message"] and error["param"] == "speculative"
    assert node.engine._retry_at == 0.0  # no engine-wide back-off was started
    # Straight after: the node's own draft, and another requested draft, both speculate.
    for speculative in ({}, {"draft_model": "qwen-draft"}):
        # Adaptive K could choose K=0 for these random drafts; fixed K shows the draft is in use.
        response = chat(url, speculative={"enabled": True, "adaptive_speculation": False, **speculative})
        assert response.json()["usage"]["speculative"]["drafted_tokens"] > 0
        assert text_of(response) == text_of(chat(url))


def test_incompatible_requested_draft_is_400_before_the_stream(api, smollm2_dir):
    url, node = api
    node.models.add("smollm2-local", str(smollm2_dir))
    error = error_of(chat(url, stream=True, speculative={"enabled": True, "draft_model": "smollm2-local"}), 400)
    assert "different tokenizers" in error["message"]


def test_models_lists_registered_models_and_what_is_on_disk(api, smollm2_dir):
    url, node = api
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert {"broken-draft", "qwen-draft", node.default_model, "smollm2-135m"} <= set(listed)
    assert listed[node.default_model]["ready"] and listed[node.default_model]["loaded"]
    assert listed["smollm2-135m"]["ready"]  # the fixture fetched it into the model store
    assert not listed["llama-3.1-70b"]["ready"] and not listed["qwen2.5-coder-7b"]["ready"]
    assert not listed["qwen-draft"]["loaded"]


# -- access -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_llama):
    with running_api(str(tiny_llama), SpeculativeConfig(), api_options={"api_key": KEY},
                     max_generate_tokens=16) as (url, node):
        yield url, node


def test_api_key_is_required_on_every_route_but_healthcheck(keyed):
    url, node = keyed
    assert httpx.get(f"{url}/healthcheck", timeout=10).status_code == 200
    bad_headers = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"},
                   {"authorization": KEY}, {"authorization": f"Bearer {KEY}x"}]
    for headers in bad_headers:
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/speculative/metrics"), ("GET", "/v1/topology"),
                             ("GET", "/v1/speculative/events"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions"), ("GET", "/no/such/route")]:
            response = httpx.request(method, f"{url}{path}", headers=headers, timeout=10,
                                     json={"prompt": "x"} if method == "POST" else None)
            error = error_of(response, 401)
            assert error["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"
    good = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=good, timeout=10).status_code == 200
    baseline = text_of(chat(url, headers=good))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)
    reply = client.chat.completions.create(model=node.default_model, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == baseline
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", timeout=30, max_retries=0).models.list()
    assert text_of(chat(url, headers=good)) == baseline


def test_post_must_be_json(served, keyed):
    body = json.dumps({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
                       "temperature": 0}).encode()
    for url, auth in ((served[0], {}), (keyed[0], {"authorization": f"Bearer {KEY}"})):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {**auth, **({"content-type": content_type} if content_type else {})}
            response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=30)
            assert error_of(response, 415)["code"] == "unsupported_media_type"
        ok = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=60,
                        headers={**auth, "content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
    assert text_of(chat(served[0])) == served[2]


def test_exposed_without_key_warns(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with caplog.at_level("WARNING", logger="exo.api"):
        assert warn_if_exposed("0.0.0.0", None)
        assert not warn_if_exposed("0.0.0.0", KEY) and not warn_if_exposed("127.0.0.1", None)
    assert len(caplog.records) == 1 and "--api-key" in caplog.records[0].getMessage()


# -- the Host names the API answers (DNS rebinding) -----------------------------------------------
@pytest.fixture(scope="module")
def unicode_keyed(tiny_llama):
    """A node whose key is not ASCII; nothing here loads a model."""
    with running_api(str(tiny_llama), SpeculativeConfig(), api_options={"api_key": UNICODE_KEY}) as (url, node):
        yield url, node


def _get(url: str, path: str, host: str | None = None, **headers) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={**({"host": host} if host else {}), **headers}, timeout=10)


def test_a_non_ascii_api_key_authenticates_with_its_utf8_bytes(unicode_keyed):
    url, _ = unicode_keyed
    good = b"Bearer " + UNICODE_KEY.encode("utf-8")
    for header in (good, b"bearer  " + good[7:]):  # any case of the scheme, spaces around the key
        assert httpx.get(f"{url}/v1/models", headers={"authorization": header}, timeout=10).status_code == 200
    for bad in (b"Bearer " + "clé-".encode("utf-8"), b"Bearer " + UNICODE_KEY.encode("utf-8") + b"x",
                b"Bearer " + "clé".encode("latin-1") + "-🔑".encode("utf-8"), b"Bearer cl\xc3"):
        response = httpx.get(f"{url}/v1/models", headers={"authorization": bad}, timeout=10)
        assert error_of(response, 401)["code"] == "invalid_api_key"


def test_a_foreign_host_gets_421_on_every_path_before_the_key(unicode_keyed):
    url, _ = unicode_keyed
    port = url.rsplit(":", 1)[1]
    auth = {"authorization": b"Bearer " + UNICODE_KEY.encode("utf-8")}
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example",
                 f"{socket.gethostname()}.evil.example", "::1", "[::1", "host:port"):
        for path in ("/healthcheck", "/v1/models", "/no/such/route"):
            error = error_of(httpx.get(f"{url}{path}", headers={"host": host, **auth}, timeout=10), 421)
            assert error["code"] == "host_not_allowed" and error["type"] == "invalid_request_error"
        response = httpx.post(f"{url}/v1/chat/completions", content=b"x", timeout=10,
                              headers={"host": host, "content-type": "text/plain"})
        assert error_of(response, 421)["code"] == "host_not_allowed"  # before the key and the media type
    own = socket.gethostname()
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "10.1.2.3", f"[::1]:{port}", "[::1]", "localhost",
                 f"LocalHost:{port}", own, f"{own}:{port}", f"{own.split('.')[0]}.local:{port}", "localhost."):
        assert _get(url, "/healthcheck", host).status_code == 200, host
        assert error_of(_get(url, "/v1/models", host), 401)["code"] == "invalid_api_key"
        assert _get(url, "/v1/models", host, **auth).status_code == 200, host


def test_allowed_hosts_replace_the_default_names_and_star_allows_any(tiny_llama):
    with running_api(str(tiny_llama), SpeculativeConfig(),
                     api_options={"allowed_hosts": ["api.example", "Other.Example:8080"]}) as (url, _):
        for host in ("api.example", "API.example:443", "other.example", "127.0.0.1", "[::1]:1"):
            assert _get(url, "/healthcheck", host).status_code == 200, host
        for host in ("localhost", "evil.example", "api.example.evil"):
            assert error_of(_get(url, "/healthcheck", host), 421)["code"] == "host_not_allowed"
    with running_api(str(tiny_llama), SpeculativeConfig(), api_options={"allowed_hosts": ["*"]}) as (url, _):
        for host in ("evil.example", "localhost", "anything:1"):
            assert _get(url, "/healthcheck", host).status_code == 200, host


def test_allowed_hosts_flag_is_repeatable_and_comma_separated():
    from exo.main import build_parser

    args = build_parser().parse_args(["--allowed-hosts", "a.example, b.example", "--allowed-hosts", "*"])
    assert parse_allowed_hosts(args.allowed_hosts) == ["a.example", "b.example", "*"]
    assert parse_allowed_hosts(build_parser().parse_args([]).allowed_hosts) is None  # the default names


# -- the engines refuse too (exo run and the ring do not go through the API) -------------------
async def _check_engine_guard(engine, model_dir, limit):
    shard = await engine.full_shard(str(model_dir))
    assert await engine.context_length(str(model_dir)) == limit
    await engine.ensure_shard(shard)
    request = uuid.uuid4().hex
    with pytest.raises(ContextLengthError, match=f"maximum context length of {limit}"):
        await engine.infer_tensor(request, shard, np.zeros((1, limit + 1), dtype=np.int64))
    assert request not in engine._caches and engine.cache_offset(request) == 0  # nothing was allocated
    await engine.infer_tensor(request, shard, np.zeros((1, limit - 4), dtype=np.int64))
    with pytest.raises(ContextLengthError):
        await engine.infer_tensor(request, shard, np.zeros((1, 5), dtype=np.int64))
    assert engine.cache_offset(request) == limit - 4
    await engine.infer_tensor(request, shard, np.zeros((1, 4), dtype=np.int64))  # exactly full is fine
    assert engine.cache_offset(request) == limit
    engine.free_cache(request)


async def test_mlx_engine_refuses_input_past_the_context(tiny_llama):
    engine = MLXInferenceEngine()
    try:
        await _check_engine_guard(engine, tiny_llama, CONTEXT)
    finally:
        engine.close()


@pytest.mark.integration
async def test_tinygrad_engine_refuses_input_past_the_context(tiny_llama):
    engine = TinygradInferenceEngine(max_context=64, use_jit=False, warmup=())
    try:
        await _check_engine_guard(engine, tiny_llama, 64)
    finally:
        engine.close()


# -- the operator's flags ----------------------------------------------------------------------
def test_model_dir_flag_registers_checked_names(tiny_llama, tmp_path, monkeypatch):
    from exo.cli_node import registered_models
    from exo.main import build_parser

    registry = registered_models([f"mine={tiny_llama}"])
    assert registry.resolve("mine") == str(tiny_llama.resolve())
    with pytest.raises(UnknownModelError):
        registry.resolve(str(tiny_llama))  # the path itself is not a name
    for bad in ("no-equals-sign", "=x", f"empty={tmp_path}", f"missing={tmp_path / 'nope'}"):
        with pytest.raises(ValueError):
            registered_models([bad])
    monkeypatch.setenv("EXO_API_KEY", KEY)
    args = build_parser().parse_args(["--model-dir", f"a={tiny_llama}", "--model-dir", f"b={tiny_llama}"])
    assert args.api_key == KEY and args.model_dir == [f"a={tiny_llama}", f"b={tiny_llama}"]
    assert build_parser().parse_args(["--api-key", "other"]).api_key == "other"


@pytest.mark.integration
def test_exo_node_process_with_api_key_and_model_dir(tiny_llama, tiny_llama_other, tmp_path):
    """The real `exo` command: the key guards its API, `--model-dir` names a model, paths are 404."""
    import subprocess
    import time

    from tools.local_ring import free_port

    port, rpc = free_port(), free_port()
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen([sys.executable, "-m", "exo.main", "--default-model", str(tiny_llama),
                             "--model-dir", f"mine={tiny_llama_other}", "--api-key", KEY, "--host", "127.0.0.1",
                             "--chatgpt-api-port", str(port), "--node-host", "127.0.0.1", "--node-port", str(rpc),
                             "--discovery-module", "none", "--max-generate-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=log, env={**os.environ, "EXO_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert node.poll() is None, (tmp_path / "node.log").read_text()
            try:
                if httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "node did not start"
            time.sleep(0.2)
        good = {"authorization": f"Bearer {KEY}"}
        assert error_of(chat(url), 401)["code"] == "invalid_api_key"
        assert text_of(chat(url, model="mine", headers=good))
        assert error_of(chat(url, model=str(tiny_llama_other), headers=good), 404)["code"] == "model_not_found"
        assert "without an API key" not in (tmp_path / "node.log").read_text()
    finally:
        node.terminate()
        out, _ = node.communicate(timeout=60)
        log.close()
    assert out == b""  # stdout carries only the product; a node has none


# -- a failure after the stream started ---------------------------------------------------------
def test_a_failure_mid_stream_ends_it_with_an_error_event_and_done(api, monkeypatch):
    """Once the 200 is out, an engine failure must still end the stream in the OpenAI way
    (an error event, then [DONE]) and never hang; the cache is freed and the node serves on."""
    url, node = api
    target = node.engine.target
    real = target.infer_tensor
    calls = 0

    async def fails_after_the_prompt(request_id, shard, input_data, inference_state=None):
        nonlocal calls
        calls += 1
        if calls > 3:  # the prompt pass and a few tokens are served first
            raise RuntimeError("injected engine failure")
        return await real(request_id, shard, input_data, inference_state)

    monkeypatch.setattr(target, "infer_tensor", fails_after_the_prompt)
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2 and all("choices" in c for c in chunks[:-1])  # token chunks came first
    error = chunks[-1]["error"]
    assert "injected engine failure" in error["message"] and error["type"] == "server_error"
    assert calls == 4
    monkeypatch.undo()
    deadline = time.monotonic() + 5  # the server finishes the response just after the client's last read
    while node.live_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.live_requests() == []


# -- what a client may make the node load --------------------------------------------------------
def test_a_client_cannot_make_the_node_fetch_a_model(api):
    """A card not on disk, as model or as draft, is refused before any fetch (a client once
    could make the node download up to a 70B model); the node keeps serving."""
    url, node = api
    assert not node.allow_model_downloads
    error = error_of(chat(url, model="llama-3.1-70b"), 404)
    assert error["code"] == "model_not_on_disk" and error["param"] == "model"
    error = error_of(chat(url, speculative={"enabled": True, "draft_model": "llama-3.2-1b"}), 400)
    assert "not on this node's disk" in error["message"] and error["param"] == "speculative"
    assert "llama-3.1-70b" not in node._full_shards


def test_client_downloads_are_off_by_default_beyond_loopback():
    from exo.cli_node import downloads_allowed
    from exo.main import build_parser

    parse = build_parser().parse_args
    assert downloads_allowed(parse(["--host", "127.0.0.1"]))
    assert not downloads_allowed(parse(["--host", "0.0.0.0"]))
    assert not downloads_allowed(parse([]))  # the default host is 0.0.0.0
    assert downloads_allowed(parse(["--host", "0.0.0.0", "--allow-model-downloads"]))
    assert not downloads_allowed(parse(["--host", "127.0.0.1", "--no-allow-model-downloads"]))

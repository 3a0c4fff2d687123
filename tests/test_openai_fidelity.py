"""OpenAI fidelity against a real server: logprobs, n, prompt lists, and 400s for the rest.

Logprobs are checked against an independent oracle: mlx-lm's own model over the whole
sequence in one forward pass, log-softmaxed at every emitted position. Plain decoding,
sequential and pipelined speculation (a bad draft and a perfect one, which exercises the
deferred bonus row) must all report exactly those numbers.
"""

import json

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm import load as mlx_lm_load

from exo.api.logprobs import TokenText
from tools.local_ring import RingCluster
from exo.speculative.config import SpeculativeConfig
from tests.helpers.api_server import running_api

TOL = 1e-3  # float32 forward passes of different shapes (one row vs a block) differ by rounding


@pytest.fixture(scope="module")
def api(tiny_llama, tiny_llama_other):
    config = SpeculativeConfig(enabled=False, draft_model=str(tiny_llama_other))
    with running_api(str(tiny_llama), config, max_generate_tokens=64) as (url, node):
        assert chat(url).status_code == 200  # loads the model (and its tokenizer)
        yield url, node


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    model, _ = mlx_lm_load(str(tiny_llama))

    def logprobs(ids: list[int]) -> np.ndarray:
        logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
        z = logits - logits.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    return logprobs


def modes(tiny_llama) -> dict:
    return {
        "plain": {"enabled": False},
        "sequential": {"enabled": True, "draft_tokens": 4, "adaptive_speculation": False},
        "pipelined": {"enabled": True, "pipelined": True, "draft_tokens": 3, "adaptive_speculation": False},
        "pipelined-perfect-draft": {"enabled": True, "pipelined": True, "draft_tokens": 3,
                                    "adaptive_speculation": False, "draft_model": str(tiny_llama)},
    }


def chat(url, content="hello there", **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 20, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def complete(url, prompt="abc", **extra):
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def chat_prompt_ids(node, content: str) -> list[int]:
    tokenizer = node.tokenizer
    return tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": content}]))


VOCAB = 320  # the tiny models' logits; their tokenizer names only ids 0..256


def ids_of(oracle, node, prompt: list[int], content: list[dict]) -> list[int]:
    """Token ids of chat logprob entries, from their exact bytes. Every tokenizer id has its own
    bytes; ids past the tokenizer (the model's padding) have none, and among those the entry
    is the one whose oracle log-prob it reports."""
    text = TokenText(node.tokenizer)
    by_bytes: dict[tuple, list[int]] = {}
    for i in range(VOCAB):
        by_bytes.setdefault(tuple(text(i)[1]), []).append(i)
    assert all(len(ids) == 1 for raw, ids in by_bytes.items() if raw)
    tokens: list[int] = []
    for entry in content:
        candidates = by_bytes[tuple(entry["bytes"])]
        if len(candidates) > 1:
            row = oracle(prompt + tokens)[-1]
            candidates = [min(candidates, key=lambda c: abs(row[c] - entry["logprob"]))]
        tokens.append(candidates[0])
    return tokens


def assert_matches_oracle(oracle, prompt: list[int], tokens: list[int], content: list[dict], node, top: int):
    rows = oracle(prompt + tokens)[len(prompt) - 1:]
    text = TokenText(node.tokenizer)
    for i, (token, entry) in enumerate(zip(tokens, content)):
        assert entry["logprob"] == pytest.approx(rows[i, token], abs=TOL), i
        assert entry["token"] == text(token)[0]
        assert len(entry["top_logprobs"]) == top
        expected = np.argsort(-rows[i], kind="stable")[:top]
        got = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert got == pytest.approx(rows[i, expected].tolist(), abs=TOL), i
        assert got == sorted(got, reverse=True)


# -- logprobs -------------------------------------------------------------------------------
def test_greedy_logprobs_are_the_targets_and_equal_under_speculation(api, oracle, tiny_llama):
    url, node = api
    prompt = chat_prompt_ids(node, "hello there")
    seen = {}
    for mode, speculative in modes(tiny_llama).items():
        body = chat(url, logprobs=True, top_logprobs=5, speculative=speculative).json()
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == body["usage"]["completion_tokens"] == 20, mode
        tokens = ids_of(oracle, node, prompt, content)
        assert_matches_oracle(oracle, prompt, tokens, content, node, 5)
        for entry in content:  # greedy: the chosen token is the most likely one
            assert entry["top_logprobs"][0]["token"] == entry["token"]
            assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        seen[mode] = (tokens, [e["logprob"] for e in content], body["usage"]["speculative"])
    plain_tokens, plain_logprobs, _ = seen["plain"]
    for mode, (tokens, logprobs, spec) in seen.items():
        assert tokens == plain_tokens, mode
        assert logprobs == pytest.approx(plain_logprobs, abs=TOL), mode
        if mode != "plain":
            assert spec["drafted_tokens"] > 0, mode
    assert seen["sequential"][2]["acceptance_rate"] < 1.0  # the bad draft was really rejected
    assert seen["pipelined-perfect-draft"][2]["acceptance_rate"] == 1.0  # deferred rows on every block


def test_sampled_logprobs_are_the_raw_distribution_at_every_emitted_position(api, oracle, tiny_llama):
    """Under sampling (temperature, top-k) the report is still the unwarped target row."""
    url, node = api
    prompt = chat_prompt_ids(node, "sample me")
    for mode, speculative in modes(tiny_llama).items():
        body = chat(url, "sample me", temperature=1.3, top_k=8, seed=11, logprobs=True, top_logprobs=3,
                    speculative=speculative).json()
        content = body["choices"][0]["logprobs"]["content"]
        assert_matches_oracle(oracle, prompt, ids_of(oracle, node, prompt, content), content, node, 3)


def test_logprobs_without_alternatives_and_off_by_default(api):
    url, node = api
    content = chat(url, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 20 and all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in content)
    plain = chat(url).json()["choices"][0]
    assert plain["logprobs"] is None
    raw = bytes(b for e in content for b in e["bytes"])  # the tokens' bytes make up the text
    assert raw.decode("utf-8", errors="replace") == plain["message"]["content"]


def test_completions_logprobs_shape_and_values(api):
    url, node = api
    prompt = chat_prompt_ids(node, "hello there")
    via_chat = chat(url, logprobs=True, top_logprobs=2, max_tokens=12).json()["choices"][0]
    body = complete(url, prompt, logprobs=2, speculative={"enabled": True, "pipelined": True}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == via_chat["message"]["content"]
    content = via_chat["logprobs"]["content"]
    assert logprobs["tokens"] == [e["token"] for e in content]
    assert logprobs["token_logprobs"] == pytest.approx([e["logprob"] for e in content], abs=TOL)
    for alternatives, entry in zip(logprobs["top_logprobs"], content):
        # keyed by token text: tokens that render alike (partial UTF-8) share a key
        expected = {}
        for alt in entry["top_logprobs"]:
            expected.setdefault(alt["token"], alt["logprob"])
        assert alternatives.keys() == expected.keys()
        assert list(alternatives.values()) == pytest.approx(list(expected.values()), abs=TOL)
    text = body["choices"][0]["text"]
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)


def test_streamed_logprobs_equal_the_non_streamed_ones(api):
    url, _ = api
    whole = chat(url, logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]["content"]
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20, "temperature": 0,
            "stream": True, "logprobs": True, "top_logprobs": 2, "speculative": {"enabled": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in whole], abs=TOL)
    body = {"prompt": "abc", "max_tokens": 8, "temperature": 0, "stream": True, "logprobs": 1}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    whole = complete(url, "abc", max_tokens=8, logprobs=1).json()["choices"][0]["logprobs"]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == whole["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == whole["text_offset"]


def test_openai_client_parses_logprobs(api):
    url, node = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    response = client.chat.completions.create(model=node.default_model, max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=3, messages=[{"role": "user", "content": "hi"}])
    content = response.choices[0].logprobs.content
    assert len(content) == 6 and len(content[0].top_logprobs) == 3
    assert isinstance(content[0].logprob, float) and isinstance(content[0].bytes, list)
    stream = client.chat.completions.create(model=node.default_model, max_tokens=6, temperature=0, logprobs=True,
                                            stream=True, messages=[{"role": "user", "content": "hi"}])
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=TOL)
    completion = client.completions.create(model=node.default_model, prompt="abc", max_tokens=5, temperature=0,
                                           logprobs=2)
    assert len(completion.choices[0].logprobs.token_logprobs) == 5
    assert all(1 <= len(alts) <= 2 for alts in completion.choices[0].logprobs.top_logprobs)


# -- n > 1 ----------------------------------------------------------------------------------
def test_n_choices_are_independent_seeded_generations(api):
    url, _ = api
    sampled = {"temperature": 1.0, "seed": 5, "max_tokens": 15}
    body = chat(url, n=3, **sampled).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["message"]["content"] for c in choices]
    assert len(set(texts)) == 3  # each its own draw
    assert texts[0] == chat(url, **sampled).json()["choices"][0]["message"]["content"]
    assert [c["message"]["content"] for c in chat(url, n=3, **sampled).json()["choices"]] == texts
    speculative = chat(url, n=3, speculative={"enabled": True, "adaptive_speculation": False}, **sampled).json()
    assert [c["message"]["content"] for c in speculative["choices"]] == [
        chat(url, n=3, speculative={"enabled": True, "adaptive_speculation": False}, **sampled).json()["choices"][i]["message"]["content"]
        for i in range(3)]
    assert body["usage"]["completion_tokens"] == 45
    assert body["usage"]["prompt_tokens"] == chat(url).json()["usage"]["prompt_tokens"]  # counted once


def test_n_choices_stream_with_their_index(api):
    url, _ = api
    sampled = {"temperature": 1.0, "seed": 9, "max_tokens": 10}
    whole = [c["message"]["content"] for c in chat(url, n=2, **sampled).json()["choices"]]
    body = {"messages": [{"role": "user", "content": "hello there"}], "stream": True, "n": 2,
            "stream_options": {"include_usage": True}, **sampled}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content") or ""
    assert [texts[0], texts[1]] == whole
    assert sum(1 for c in chunks[:-1] if c["choices"][0]["finish_reason"]) == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_n_with_the_openai_client_and_its_cap(api):
    url, node = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    response = client.chat.completions.create(model=node.default_model, max_tokens=5, temperature=0, n=2,
                                              messages=[{"role": "user", "content": "hi"}])
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content == response.choices[1].message.content  # greedy
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=node.default_model, max_tokens=5, n=9,
                                       messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["param"] == "n"


# -- completions prompt lists -----------------------------------------------------------------
def test_completions_prompt_list_gives_one_choice_per_prompt(api):
    url, node = api
    single = {p: complete(url, p).json()["choices"][0]["text"] for p in ("abc", "xyz")}
    body = complete(url, ["abc", "xyz"]).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, single["abc"]), (1, single["xyz"])]
    assert body["usage"]["completion_tokens"] == 24
    ids = [node.tokenizer.encode(p) for p in ("abc", "xyz")]
    assert body["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert [c["text"] for c in complete(url, ids).json()["choices"]] == [single["abc"], single["xyz"]]
    assert complete(url, ids[0]).json()["choices"][0]["text"] == single["abc"]
    both = complete(url, ["abc", "xyz"], n=2).json()["choices"]
    assert [c["index"] for c in both] == [0, 1, 2, 3]
    assert [c["text"] for c in both] == [single["abc"], single["abc"], single["xyz"], single["xyz"]]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    parsed = client.completions.create(model=node.default_model, prompt=["abc", "xyz"], max_tokens=12,
                                       temperature=0)
    assert [c.text for c in parsed.choices] == [single["abc"], single["xyz"]]


# -- unsupported parameters: 400 naming the parameter -------------------------------------------
CHAT_REFUSED = [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"},
     "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"65": 10}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
]
COMPLETION_REFUSED = [
    ({"echo": True}, "echo"),
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"logprobs": 6}, "logprobs"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"logit_bias": {"65": -100}}, "logit_bias"),
    ({"prompt": ["abc", 5]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
]


@pytest.fixture(scope="module")
def baseline(api):
    url, _ = api
    return chat(url).json()["choices"][0]["message"]["content"], complete(url).json()["choices"][0]["text"]


@pytest.mark.parametrize("extra,param", CHAT_REFUSED, ids=[p for _, p in CHAT_REFUSED])
def test_unsupported_chat_parameters_are_refused_by_name(api, baseline, extra, param):
    url, _ = api
    response = chat(url, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"] or "content parts" in error["message"]
    assert chat(url).json()["choices"][0]["message"]["content"] == baseline[0]  # the node still serves


@pytest.mark.parametrize("extra,param", COMPLETION_REFUSED, ids=[f"{p}-{i}" for i, (_, p) in
                                                                 enumerate(COMPLETION_REFUSED)])
def test_unsupported_completion_parameters_are_refused_by_name(api, baseline, extra, param):
    url, _ = api
    response = complete(url, **{"prompt": "abc", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert complete(url).json()["choices"][0]["text"] == baseline[1]


def test_neutral_values_of_unsupported_parameters_are_accepted(api, baseline):
    url, _ = api
    neutral = {"response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
               "logit_bias": {}, "tool_choice": "none", "tools": [], "n": 1}
    assert chat(url, **neutral).json()["choices"][0]["message"]["content"] == baseline[0]
    assert complete(url, echo=False, best_of=1, suffix=None).json()["choices"][0]["text"] == baseline[1]


def test_openai_client_sees_the_refusal(api, baseline):
    url, node = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=node.default_model, max_tokens=5, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "give me json"}])
    assert raised.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=node.default_model, max_tokens=5, tool_choice="required",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            messages=[{"role": "user", "content": "call f"}])
    assert raised.value.body["param"] == "tools"
    assert chat(url).json()["choices"][0]["message"]["content"] == baseline[0]


# -- streamed usage: only when asked, in its own last chunk -------------------------------------
def _stream(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def test_a_stream_carries_usage_only_when_asked_in_a_last_chunk_without_choices(api):
    url, _ = api
    chat_body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "temperature": 0,
                 "stream": True, "n": 2}
    completion_body = {"prompt": ["abc", "xyz"], "max_tokens": 5, "temperature": 0, "stream": True}
    for path, body, tokens in (("/v1/chat/completions", chat_body, 12), ("/v1/completions", completion_body, 10)):
        for options in (None, {}, {"include_usage": False}):
            extra = {} if options is None else {"stream_options": options}
            chunks = _stream(url, path, {**body, **extra})
            assert all(c.get("usage") is None and len(c["choices"]) == 1 for c in chunks), path
        chunks = _stream(url, path, {**body, "stream_options": {"include_usage": True}})
        *choices, last = chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == tokens
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + tokens
        assert last["id"] == choices[0]["id"] and last["object"] == choices[0]["object"]
        assert all(len(c["choices"]) == 1 and "usage" in c and c["usage"] is None for c in choices)  # as OpenAI
        assert sorted(c["choices"][0]["index"] for c in choices if c["choices"][0]["finish_reason"]) == [0, 1]


def test_stream_options_without_stream_is_a_400(api):
    url, _ = api
    for stream in (False, None):
        extra = {"stream_options": {"include_usage": True}, **({"stream": stream} if stream is not None else {})}
        for response in (chat(url, **extra), complete(url, **extra)):
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "stream_options" and "only allowed when stream is true" in error["message"]


def test_openai_client_streams_usage_when_asked(api):
    url, node = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model=node.default_model, max_tokens=5, temperature=0,
                                                 stream=True, messages=messages))
    assert all(c.usage is None and c.choices for c in chunks)
    chunks = list(client.chat.completions.create(model=node.default_model, max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, messages=messages))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    completion = list(client.completions.create(model=node.default_model, prompt="abc", max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert completion[-1].choices == [] and completion[-1].usage.completion_tokens == 4


# -- the request's fields: as OpenAI checks them ------------------------------------------------
def test_more_than_four_stop_strings_is_a_400(api, baseline):
    url, _ = api
    for response in (chat(url, stop=["a", "b", "c", "d", "e"]), complete(url, stop=["a", "b", "c", "d", "e"])):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stop"
    assert chat(url, stop=["\x00", "\x01", "\x02", "\x03"]).json()["choices"][0]["message"]["content"] == baseline[0]


@pytest.mark.parametrize("path,field", [("/v1/chat/completions", "temprature"), ("/v1/chat/completions", "prompt"),
                                        ("/v1/chat/completions", "echo"), ("/v1/completions", "messages"),
                                        ("/v1/completions", "max_token"), ("/v1/completions", "tools")])
def test_an_unknown_field_is_unrecognized_as_openai_says(api, path, field):
    url, _ = api
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    response = httpx.post(f"{url}{path}", json={**base, "max_tokens": 2, field: 1}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] == f"Unrecognized request argument supplied: {field}" and error["param"] == field


IGNORED = {"user": "someone", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
           "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
           "reasoning_effort": "low", "prompt_cache_key": "k", "safety_identifier": "s", "verbosity": "medium",
           "web_search_options": None, "audio": None, "modalities": ["text"], "function_call": "none",
           "functions": [], "max_completion_tokens": 20, "seed": 3, "top_k": 0}


def test_every_openai_field_the_node_does_not_need_is_accepted(api, baseline):
    url, node = api
    assert chat(url, **IGNORED).json()["choices"][0]["message"]["content"] == baseline[0]
    legacy = {"user": "someone", "echo": False, "suffix": None, "best_of": 1, "logit_bias": {}, "seed": 3}
    assert complete(url, **legacy).json()["choices"][0]["text"] == baseline[1]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    reply = client.chat.completions.create(model=node.default_model, max_tokens=20, temperature=0, user="u",
                                           metadata={"k": "v"}, store=False, service_tier="auto",
                                           messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == baseline[0]
    refused = chat(url, web_search_options={"search_context_size": "low"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "web_search_options"


def test_a_message_without_content_is_a_400_but_an_assistants(api):
    url, _ = api
    for message in ({"role": "user"}, {"role": "user", "content": None}, {"role": "system", "content": None}):
        body = {"messages": [{"role": "user", "content": "hi"}, message], "max_tokens": 2}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "messages[1].content"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
             {"role": "user", "content": ""}]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": turns, "max_tokens": 2}, timeout=30)
    assert response.status_code == 200, response.text


# -- through a real ring ----------------------------------------------------------------------
@pytest.mark.integration
def test_ring_logprobs_equal_single_node(tmp_path, api, tiny_llama, tiny_llama_other):
    """The last stage reports the rows it judged; any node's API relays them (GenerateChunk)."""
    url, _ = api
    request = {"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0, "logprobs": 3}
    single = httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()["choices"][0]
    with RingCluster(tmp_path, 2, str(tiny_llama), str(tiny_llama_other)) as cluster:
        for api_url, speculative in ((cluster.url, {"enabled": False}),
                                     (cluster.url, {"enabled": True, "pipelined": True, "draft_tokens": 3}),
                                     (cluster.url, {"enabled": True, "pipelined": True, "draft_tokens": 3,
                                                    "adaptive_speculation": False, "draft_model": str(tiny_llama)}),
                                     (cluster.api_url(1), {"enabled": True, "draft_tokens": 3})):
            body = httpx.post(f"{api_url}/v1/completions", json={**request, "speculative": speculative},
                              timeout=120).json()["choices"][0]
            assert body["text"] == single["text"]
            assert body["logprobs"]["tokens"] == single["logprobs"]["tokens"]
            assert body["logprobs"]["token_logprobs"] == pytest.approx(single["logprobs"]["token_logprobs"], abs=TOL)
            assert [list(d) for d in body["logprobs"]["top_logprobs"]] == [
                list(d) for d in single["logprobs"]["top_logprobs"]]

"""Normal vs speculative generation through a running exo node's API.

Start a node first (`.venv/bin/exo --enable-speculative --pipelined`), then:

    .venv/bin/python examples/speculative_example.py [--url http://127.0.0.1:52415] [--max-tokens 128]

Streams the same prompt twice (speculation off, then on) and prints tokens/s, acceptance
and the speed-up; greedy decoding, so both texts must be identical.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."


def stream(url: str, model: str | None, max_tokens: int, speculative: dict) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "speculative": speculative}
    if model:
        body["model"] = model
    text, tokens, first, usage = [], 0, None, {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            if not chunk["choices"]:  # the last chunk: only the usage
                continue
            choice = chunk["choices"][0]
            if choice["finish_reason"] is None:
                first = first or time.perf_counter()
                tokens += 1
            text.append(choice["delta"].get("content") or "")
    elapsed = time.perf_counter() - first
    return {"text": "".join(text), "tokens": tokens, "tokens_per_second": (tokens - 1) / elapsed, "usage": usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:52415")
    parser.add_argument("--model", default=None, help="model id (default: the node's default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    normal = stream(args.url, args.model, args.max_tokens, {"enabled": False})
    fast = stream(args.url, args.model, args.max_tokens, {"enabled": True})
    spec = fast["usage"].get("speculative") or {}
    print(fast["text"])
    print()
    print(f"normal:      {normal['tokens_per_second']:.2f} tokens/s ({normal['tokens']} tokens)")
    print(f"speculative: {fast['tokens_per_second']:.2f} tokens/s, acceptance {spec.get('acceptance_rate', 0):.0%}, "
          f"{spec.get('mean_accepted_length', 0):.2f} tokens per verification")
    print(f"speed-up:    {fast['tokens_per_second'] / normal['tokens_per_second']:.2f}x; "
          f"identical output: {fast['text'] == normal['text']}")


if __name__ == "__main__":
    main()

"""A soak a user would run before trusting a node: mixed traffic for a long while, then checks.

    make soak                                   # 30 minutes
    .venv/bin/python bench/soak.py [--minutes 30] [--clients 10] [--port 52490] [--seed 0]

One real `exo` node (`python -m exo.main`, uvicorn, batching on, `--max-batch-size 8`) serves a
tiny random-weight llama (4 layers, 4096-token context, written here: no download) with two
drafts registered by the operator (`--model-dir`): its own first two layers (the node's draft,
often accepted) and an unrelated random model (mostly rejected). `--clients` threads send
requests one after another until the time is up, each drawing from a seeded mix:

- short chats and completions (8-64 tokens), streaming or not, greedy or seeded sampling;
- long ones (2,500 tokens generated), 1 in 25;
- per-request `speculative` objects: off, suffix, model, hybrid, pipelined, the other draft;
- hang-ups (1 in 8): a stream closed after a few chunks, or a request given up after 0.3 s.

Checked at the end (exit status 1 if any fails): no request failed (no 5xx, no error event in
a stream, no connection error; 429s are counted apart and must stay rare), the node's own
`exo_requests_total{status="failed"}` is 0, its log holds no traceback, every greedy answer to
the fixed prompts equals the first one seen for them (plain decoding, measured at the start),
and resident memory and open file descriptors stay flat: the median RSS of the last fifth of
the run is within 15 % (or 40 MB) of the median after warm-up (the second fifth), and the
most fds of the last fifth exceed the warm-up's by at most 8. stdout gets the summary JSON;
progress goes to stderr; bench/results/soak.json keeps the summary and the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import NodeProcess, machine, median, pyplot, save, save_figure  # noqa: E402

GREEDY_PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
WORDS = "alpha beta gamma delta river stone cloud paper light window garden number".split()


def build_models(workdir: Path) -> dict[str, Path]:
    from tools.early_exit import make_early_exit
    from tests.helpers.tiny_models import make_tiny_model

    target = make_tiny_model(workdir / "target", "llama", layers=4, seed=1, context=4096)
    return {"target": target, "near": make_early_exit(target, workdir / "near", 2),
            "far": make_tiny_model(workdir / "far", "llama", layers=2, seed=7, context=4096)}


class Node(NodeProcess):
    """The `exo` node under test; `sample()` reads its memory and descriptors from /proc."""

    def __init__(self, models: dict[str, Path], port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "exo.main", "--enable-speculative", "--default-model", str(models["target"]),
                   "--draft-model", str(models["near"]), "--model-dir", f"near={models['near']}",
                   "--model-dir", f"far={models['far']}", "--max-batch-size", "8", "--discovery-module", "none",
                   "--host", "127.0.0.1", "--chatgpt-api-port", str(port), "--max-generate-tokens", "64",
                   "--max-concurrent-requests", "16"]
        super().__init__(command, log_path, self.url, cwd=ROOT)

    def sample(self) -> dict:
        """Resident memory (bytes) and open file descriptors of the node's process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
        return {"t": time.monotonic(), "rss": rss, "fds": len(os.listdir(f"/proc/{self.process.pid}/fd"))}


SPECULATIVE = [
    {"enabled": False},
    {"enabled": True},
    {"enabled": True, "drafter": "suffix"},
    {"enabled": True, "drafter": "model"},
    {"enabled": True, "drafter": "hybrid", "pipelined": True},
    {"enabled": True, "drafter": "model", "draft_model": "far"},
    {"enabled": True, "draft_model": "far", "pipelined": True},
    {"enabled": True, "draft_tokens": 6, "adaptive_speculation": False},
]


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.expected: dict[str, str] = {}
        self.mismatches: list[dict] = []

    def add(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def fail(self, why: str) -> None:
        with self.lock:
            self.counts["failed"] += 1
            if len(self.failures) < 50:
                self.failures.append(why)

    def greedy(self, prompt: str, text: str, how: str) -> None:
        with self.lock:
            expected = self.expected.setdefault(prompt, text)
            if text != expected and len(self.mismatches) < 20:
                self.mismatches.append({"prompt": prompt, "how": how, "got": text, "expected": expected})
            self.counts["greedy_checked"] += 1


def request_body(rng: random.Random) -> tuple[str, dict, str]:
    """(endpoint, body, kind) of one request drawn from the mix."""
    speculative = rng.choice(SPECULATIVE)
    greedy_check = rng.random() < 0.3
    if greedy_check:
        prompt, max_tokens, sampling = rng.choice(GREEDY_PROMPTS), 32, {"temperature": 0}
    else:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        max_tokens = 2500 if rng.random() < 0.04 else rng.randint(8, 64)
        sampling = {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "seed": rng.randint(0, 999)}
    stream = rng.random() < 0.5
    body = {"max_tokens": max_tokens, "stream": stream, "speculative": speculative, **sampling}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice("aeiou")]
        greedy_check = False
    if rng.random() < 0.5:
        endpoint, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        endpoint, body["prompt"] = "/v1/completions", prompt
    if greedy_check:
        body["prompt_for_check"] = prompt  # removed before sending
    kind = "long" if max_tokens == 2500 else "stream" if stream else "plain"
    return endpoint, body, kind


def text_of(choice: dict) -> str:
    return choice.get("text") or (choice.get("message") or {}).get("content") or (choice.get("delta") or {}).get(
        "content") or ""


def refused(response: httpx.Response, how: str, tally: Tally) -> bool:
    """Whether the request ended here: a 429 (counted apart) or any other non-200 (a failure)."""
    if response.status_code == 429:
        tally.add("rejected_429")
    elif response.status_code != 200:
        tally.fail(f"{how}: {response.status_code} {response.read()[:200]!r}")
    return response.status_code != 200


def one(client: httpx.Client, url: str, rng: random.Random, tally: Tally) -> None:
    endpoint, body, kind = request_body(rng)
    check = body.pop("prompt_for_check", None)
    how = f"{endpoint} stream={body['stream']} speculative={body['speculative']}"
    hang_up = rng.random() < 0.125
    try:
        if body["stream"]:
            pieces, chunks = [], 0
            with client.stream("POST", url + endpoint, json=body, timeout=600) as response:
                if refused(response, how, tally):
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        tally.fail(f"{how}: in-stream error {event['error']}")
                        return
                    pieces += [text_of(c) for c in event.get("choices", [])]
                    chunks += 1
                    if hang_up and chunks >= 3:
                        tally.add("hung_up")
                        return
            text = "".join(pieces)
        else:
            timeout = 0.3 if hang_up else 600
            try:
                response = client.post(url + endpoint, json=body, timeout=timeout)
            except httpx.TimeoutException:
                if hang_up:
                    tally.add("hung_up")
                    return
                raise
            if refused(response, how, tally):
                return
            text = text_of(response.json()["choices"][0])
    except httpx.HTTPError as exc:
        tally.fail(f"{how}: {type(exc).__name__}: {exc}")
        return
    tally.add(kind)
    if check is not None:
        tally.greedy(f"{endpoint} {check}", text, how)


def client_loop(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            one(client, url, rng, tally)


def prometheus_value(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def flatness(samples: list[dict]) -> dict:
    fifth = max(1, len(samples) // 5)
    warm, last = samples[fifth:2 * fifth], samples[-fifth:]
    rss_warm, rss_last = median([s["rss"] for s in warm]), median([s["rss"] for s in last])
    fds_warm, fds_last = max(s["fds"] for s in warm), max(s["fds"] for s in last)
    growth = rss_last - rss_warm
    return {"rss_start_mb": samples[0]["rss"] / 1e6, "rss_warm_mb": rss_warm / 1e6, "rss_end_mb": rss_last / 1e6,
            "fds_start": samples[0]["fds"], "fds_warm": fds_warm, "fds_end": fds_last,
            "rss_flat": growth <= max(0.15 * rss_warm, 40e6), "fds_flat": fds_last - fds_warm <= 8}


def plot(samples: list[dict]) -> None:
    """Resident memory and open descriptors of the node over the run (bench/results/soak.png)."""
    plt = pyplot()
    minutes = [(s["t"] - samples[0]["t"]) / 60 for s in samples]
    fig, rss_ax = plt.subplots(figsize=(8, 4))
    rss_ax.plot(minutes, [s["rss"] / 1e6 for s in samples], color="tab:blue")
    rss_ax.set_xlabel("minutes")
    rss_ax.set_ylabel("RSS (MB)", color="tab:blue")
    fds_ax = rss_ax.twinx()
    fds_ax.plot(minutes, [s["fds"] for s in samples], color="tab:orange")
    fds_ax.set_ylabel("open file descriptors", color="tab:orange")
    rss_ax.set_title("exo node under the soak's mixed traffic")
    save_figure(fig, "soak")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--port", type=int, default=52490)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="exo-soak-"))
    models = build_models(workdir)
    node = Node(models, args.port, workdir / "node.log")
    tally, samples = Tally(), []
    started = time.monotonic()
    try:
        node.wait_ready()
        for prompt in GREEDY_PROMPTS:  # the expected greedy texts: plain decoding, before any load
            for endpoint, key in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
                value = [{"role": "user", "content": prompt}] if key == "messages" else prompt
                body = {key: value, "max_tokens": 32, "temperature": 0, "speculative": {"enabled": False}}
                response = httpx.post(node.url + endpoint, json=body, timeout=120)
                response.raise_for_status()
                tally.expected[f"{endpoint} {prompt}"] = text_of(response.json()["choices"][0])
        deadline = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(node.url, args.seed * 1000 + i, deadline, tally),
                                    daemon=True) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            samples.append(node.sample())
            done = sum(v for k, v in tally.counts.items() if k in ("plain", "stream", "long", "hung_up"))
            print(f"[soak {(time.monotonic() - started) / 60:5.1f} min] {done} requests, "
                  f"{tally.counts['failed']} failed, rss {samples[-1]['rss'] / 1e6:.0f} MB, "
                  f"fds {samples[-1]['fds']}", file=sys.stderr, flush=True)
            time.sleep(10)
        for thread in threads:
            thread.join()
        samples.append(node.sample())
        node_failed = prometheus_value(node.url, "exo_requests_total", '{status="failed"}')
        node_counts = {status: prometheus_value(node.url, "exo_requests_total", f'{{status="{status}"}}')
                       for status in ("completed", "stopped", "cancelled", "failed", "rejected")}
    finally:
        node.stop()
    log = node.log_path.read_text()
    tracebacks = log.count("Traceback")
    flat = flatness(samples)
    requests = sum(v for k, v in tally.counts.items() if k in ("plain", "stream", "long", "hung_up", "failed",
                                                                "rejected_429"))
    checks = {"no_failed_request": tally.counts["failed"] == 0 and node_failed == 0, "no_traceback": tracebacks == 0,
              "greedy_exact": not tally.mismatches, "rss_flat": flat["rss_flat"], "fds_flat": flat["fds_flat"],
              "rejections_rare": tally.counts["rejected_429"] <= 0.01 * max(requests, 1)}
    summary = {"minutes": args.minutes, "clients": args.clients, "requests": requests, "client_counts": dict(tally.counts),
               "node_counts": node_counts, "tracebacks": tracebacks, **flat, "checks": checks,
               "passed": all(checks.values()), "failures": tally.failures, "mismatches": tally.mismatches,
               "log": str(node.log_path)}
    save("soak", {"machine": machine(), "summary": summary, "samples": samples})
    plot(samples)
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

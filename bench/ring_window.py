"""Blocks in flight on a real ring: plain ring vs a window of W = 1, 2, 3 blocks, per hop delay.

    .venv/bin/python bench/ring_window.py [--nodes 2] [--delays 0 5 20] [--windows 1 2 3]
        [--drafters suffix model] [--max-tokens 48] [--target qwen2.5-coder-1.5b]
        [--draft qwen2.5-coder-0.5b] [--memory-gb 2 2] [--name ring_window]

Each ring is real `exo` node processes on loopback, each pinned to a core of its own with one
BLAS thread (node 0 holds the first layers, runs the draft and schedules); link latency is
the transport's one-way delay per message (`--link-delay-ms`). Per cluster, for each prompt
(one code-editing and one code-generation request, greedy), the modes run back to back so
the machine's drift hits them all: plain ring decoding, then pipelined speculation with every
drafter at every fixed window. Every output is checked equal to the plain ring's.

Per run: decode tokens/s (first to last streamed token), the ring's passes and most blocks in
flight, every stage's compute, discarded compute, dropped blocks, messages and bytes (from
the stages' final reports), and the (K, accepted) of every verified block (from the draft
node's event stream: what the simulator replays, see bench/ring_sim_check.py).
Writes bench/results/ring_window.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import RESULTS, grouped_bars, machine, pyplot, save, save_figure
from drafter_prompts import build
from ring_decode import stream_chat


def prompts() -> dict[str, str]:
    built = build(1)
    return {"code editing": built["code editing"][0], "code generation": built["code generation"][0]}


class BlockLog:
    """Every block_verified event of the draft node, by request id (read in a thread)."""

    def __init__(self, url: str):
        self.blocks: dict[str, list[tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()

    def _read(self, url: str) -> None:
        try:
            with httpx.stream("GET", f"{url}/v1/speculative/events", timeout=None) as response:
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if event.get("type") == "block_verified":
                            self.blocks.setdefault(event["request_id"], []).append(
                                (event["drafted"], event["accepted"]))
        except httpx.HTTPError:
            if not self._stop.is_set():
                raise  # the node went away mid-run: the run's blocks are incomplete

    def close(self) -> None:
        self._stop.set()


def request_details(url: str, timeout_s: float = 30) -> tuple[dict, dict]:
    """The last request's metrics and every stage's final totals (they arrive in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = httpx.get(f"{url}/v1/speculative/metrics", timeout=30).json()
        last = metrics["recent"][-1]
        stages = metrics["cluster"]["stages"].get(last["request_id"], {})
        every = {s["node_id"] for s in last["ring"]["stages"]}
        if set(stages) == every and all(s["final"] for s in stages.values()) or time.monotonic() > deadline:
            return last, stages
        time.sleep(0.2)


def modes(args: argparse.Namespace) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {"plain ring": None}
    for drafter in args.drafters:
        for w in args.windows:
            out[f"{drafter} W={w}"] = {"enabled": True, "pipelined": True, "drafter": drafter, "ring_window": w}
    return out


def measure(args: argparse.Namespace) -> list[dict]:
    import exo  # noqa: F401  (model cards, BLAS)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tools/ is not installed
    from tools.local_ring import RingCluster
    from exo.inference.sources import model_dir_for

    target, draft = str(model_dir_for(args.target)), str(model_dir_for(args.draft))
    cores = sorted(os.sched_getaffinity(0))
    rows: list[dict] = []
    for n in args.nodes:
        for delay in args.delays:
            logs = Path(tempfile.gettempdir()) / "exo-ring-window" / f"{n}-{delay:g}"
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
            print(f"cluster logs: {logs}", flush=True)
            cpus = [[cores[i % len(cores)]] for i in range(n)]
            with RingCluster(logs, n, target, draft, ring_timeout_s=600, cpus=cpus, memory_gb=args.memory_gb,
                             extra=("--link-delay-ms", str(delay))) as cluster:
                url = cluster.url
                events = BlockLog(url)
                try:
                    for speculative in modes(args).values():  # load every stage and the draft
                        stream_chat(url, "def add(a, b):", 4, speculative)
                    for kind, prompt in prompts().items():
                        plain_text = None
                        for mode, speculative in modes(args).items():
                            run = stream_chat(url, prompt, args.max_tokens, speculative)
                            info, stages = request_details(url)
                            plain_text = run["text"] if speculative is None else plain_text
                            ring = info.get("ring") or {}
                            row = {"nodes": n, "delay_ms": delay, "prompt": kind, "mode": mode,
                                   "drafter": speculative["drafter"] if speculative else None,
                                   "window": speculative["ring_window"] if speculative else 0,
                                   "identical_to_plain": run["text"] == plain_text, **run,
                                   "acceptance_rate": info["acceptance_rate"],
                                   "mean_accepted_length": info["mean_accepted_length"],
                                   "draft_time": info["draft_time"], "ring": ring,
                                   "stages": stages, "blocks": events.blocks.get(info["request_id"], [])}
                            rows.append(row)
                            print(f"{n} nodes {delay:4g} ms {kind:15s} {mode:13s} {run['tokens_per_second']:5.2f} "
                                  f"tok/s  acceptance {row['acceptance_rate']:.2f}  in flight "
                                  f"{ring.get('max_in_flight')}  same {row['identical_to_plain']}", flush=True)
                            save("ring_window.partial", {"rows": rows})
                finally:
                    events.close()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for row in rows:
        group = [r for r in rows if (r["nodes"], r["delay_ms"], r["prompt"]) ==
                 (row["nodes"], row["delay_ms"], row["prompt"])]
        plain = next(r for r in group if r["mode"] == "plain ring")
        w1 = next((r for r in group if r["drafter"] == row["drafter"] and r["window"] == 1), None)
        tokens = max(1, row["tokens"])
        stages = row["stages"]
        table.append({k: row[k] for k in ("nodes", "delay_ms", "prompt", "mode", "drafter", "window",
                                          "tokens_per_second", "acceptance_rate", "identical_to_plain")}
                     | {"vs_plain_ring": row["tokens_per_second"] / plain["tokens_per_second"],
                        "vs_w1": row["tokens_per_second"] / w1["tokens_per_second"] if w1 else None,
                        "max_in_flight": row["ring"].get("max_in_flight"),
                        "messages_per_token": sum(s["messages"] for s in stages.values()) / tokens,
                        "bytes_per_token": sum(s["bytes_sent"] for s in stages.values()) / tokens,
                        "stage_busy_seconds": {n: s["forward_seconds"] - s["discarded_seconds"]
                                               for n, s in stages.items()},
                        "stage_discarded_seconds": {n: s["discarded_seconds"] for n, s in stages.items()},
                        "stage_idle_seconds": {n: max(0.0, row["request_seconds"] - s["forward_seconds"])
                                               for n, s in stages.items()},
                        "dropped_blocks": sum(s["dropped"] for s in stages.values()),
                        "discarded_blocks": sum(s["discarded"] for s in stages.values())})
    return table


def best_windows(table: list[dict]) -> list[dict]:
    """Per (nodes, delay, prompt, drafter): W = 1 and the best W, by tokens/s."""
    out = []
    keys = {(e["nodes"], e["delay_ms"], e["prompt"], e["drafter"]) for e in table if e["drafter"]}
    for key in sorted(keys):
        runs = [e for e in table if (e["nodes"], e["delay_ms"], e["prompt"], e["drafter"]) == key]
        best = max(runs, key=lambda e: e["tokens_per_second"])
        w1 = next(e for e in runs if e["window"] == 1)
        plain = next(e for e in table if (e["nodes"], e["delay_ms"], e["prompt"], e["mode"]) ==
                     (*key[:3], "plain ring"))
        out.append({"nodes": key[0], "delay_ms": key[1], "prompt": key[2], "drafter": key[3],
                    "plain_tps": plain["tokens_per_second"], "w1_tps": w1["tokens_per_second"],
                    "best_window": best["window"], "best_tps": best["tokens_per_second"],
                    "best_vs_w1": best["tokens_per_second"] / w1["tokens_per_second"],
                    "best_vs_plain": best["tokens_per_second"] / plain["tokens_per_second"]})
    return out


def plot(table: list[dict], name: str) -> None:
    plt = pyplot()
    groups = sorted({(e["nodes"], e["delay_ms"], e["prompt"]) for e in table})
    mode_names = list(dict.fromkeys(e["mode"] for e in table))
    labels = [f"{n}n {d:g} ms\n{p}" for n, d, p in groups]

    def value(mode: str, group: tuple, field: str) -> float:
        entry = next((e for e in table if (e["nodes"], e["delay_ms"], e["prompt"]) == group and e["mode"] == mode),
                     None)
        return entry[field] if entry else 0.0

    fig, axes = plt.subplots(2, 1, figsize=(max(10, 2.2 * len(groups)), 8))
    grouped_bars(axes[0], labels, {m: [value(m, g, "tokens_per_second") for g in groups] for m in mode_names},
                 fontsize=8)
    axes[0].set_title("decode tokens/s: plain ring vs pipelined speculation with W blocks in flight")
    axes[0].legend(fontsize=7, ncol=4)
    grouped_bars(axes[1], labels, {m: [value(m, g, "messages_per_token") for g in groups] for m in mode_names},
                 fontsize=8)
    axes[1].set_title("network messages per emitted token")
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 5, 20])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--drafters", nargs="+", default=["suffix", "model"], choices=["suffix", "model", "hybrid"])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--memory-gb", type=float, nargs="+", default=None,
                        help="memory each node announces (its share of the layers); default: node 0 "
                             "a little more, so it holds the most")
    parser.add_argument("--name", default="ring_window")
    args = parser.parse_args()
    rows = measure(args)
    table = summarise(rows)
    best = best_windows(table)
    save(args.name, {"machine": machine(), "args": vars(args), "best": best, "summary": table, "runs": rows})
    (RESULTS / "ring_window.partial.json").unlink(missing_ok=True)
    plot(table, args.name)
    for e in best:
        print(f"| {e['nodes']} | {e['delay_ms']:g} | {e['prompt']} | {e['drafter']} | {e['plain_tps']:.2f} | "
              f"{e['w1_tps']:.2f} | {e['best_window']} | {e['best_tps']:.2f} | {e['best_vs_w1']:.2f}x | "
              f"{e['best_vs_plain']:.2f}x |")


if __name__ == "__main__":
    main()

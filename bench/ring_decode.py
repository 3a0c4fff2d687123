"""A target split over a ring of node processes: plain ring decoding vs speculation, per link latency.

    .venv/bin/python bench/ring_decode.py [--nodes 1 2 3] [--delays 0 5 20 50] [--max-tokens 64]
        [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b] [--prompts code]
        [--layout even|light-draft]

Each ring is real `exo` node processes on loopback (gRPC between them), each pinned to one
core with one BLAS thread where the machine has enough cores; node 0 holds layer 0, runs the
draft and serves the API. Link latency is injected by the transport (`--link-delay-ms`, a
one-way delay on every message to a peer): this kernel has no netem qdisc, so real network
emulation on a veth pair is not available here. A 1-node "ring" is the same node alone.

Layouts: `even` (the default a user gets: equal memory, layer 0's node runs the draft) and
`light-draft` (the last node announces a quarter of the others' memory, so it holds few
target layers, and runs the draft with `--draft-node`, on a core of its own): there the draft
really overlaps the other nodes' compute in pipelined mode.

Per (nodes, delay, mode, prompt): decode tokens/s (first to last streamed token), the speed-up
over plain ring decoding in the same cluster, acceptance, and the origin's time breakdown:
compute per stage, ring overhead (network + serialisation + waiting), draft busy/idle.
Writes bench/results/ring_decode.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import RESULTS, grouped_bars, machine, median, pyplot, save, save_figure, table_cells
from speculative_decode import PROMPTS

MODES = {
    "plain ring": None,
    "sequential": {"enabled": True},
    "pipelined": {"enabled": True, "pipelined": True},
}


def post_json(url: str, body: dict, timeout: float = 1800) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stream_chat(url: str, prompt: str, max_tokens: int, speculative: dict | None) -> dict:
    """Stream one greedy chat completion; time the first and the last token."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    if speculative is not None:
        body["speculative"] = speculative
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    pieces, stamps = [], []
    sent = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            choice = event["choices"][0]
            if choice["finish_reason"] is None:
                stamps.append(time.perf_counter())
                pieces.append(choice["delta"].get("content") or "")
    decode_s = stamps[-1] - stamps[0]
    return {"text": "".join(pieces), "tokens": len(stamps), "decode_seconds": decode_s,
            "request_seconds": stamps[-1] - sent,
            "tokens_per_second": (len(stamps) - 1) / decode_s}


def last_request(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/speculative/metrics", timeout=30) as response:
        return json.loads(response.read())["recent"][-1]


def measure(args: argparse.Namespace) -> list[dict]:
    import exo  # noqa: F401  (model cards, BLAS)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tools/ is not installed
    from tools.local_ring import RingCluster
    from exo.inference.sources import model_dir_for

    target, draft = str(model_dir_for(args.target)), str(model_dir_for(args.draft))
    cores = sorted(os.sched_getaffinity(0))
    rows = []
    for n in args.nodes:
        for delay in (args.delays if n > 1 else [0]):
            cpus, memory, extra = None, None, ("--link-delay-ms", str(delay))
            if n > 1:
                cpus = [[cores[i % len(cores)]] for i in range(n)]
            if n > 1 and args.layout == "light-draft":
                memory = [4.0] * (n - 1) + [1.0]
                extra += ("--draft-node", f"node{n - 1}")
                # the draft node alone on the last core, the others share the rest
                cpus = [[cores[i % max(1, len(cores) - 1)]] for i in range(n - 1)] + [[cores[-1]]]
            logs = Path(tempfile.gettempdir()) / "exo-ring-bench" / f"{args.layout}-{n}-{delay:g}"
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
            print(f"cluster logs: {logs}", flush=True)
            with RingCluster(
                    logs, n, target, draft, ring_timeout_s=600, cpus=cpus, memory_gb=memory,
                    extra=extra) as cluster:
                url = cluster.api_url(n - 1) if args.layout == "light-draft" else cluster.url  # the draft node
                for mode, speculative in MODES.items():  # load every stage and the draft, warm adaptive K
                    stream_chat(url, PROMPTS["code"], 8, speculative)
                for kind in args.prompts:
                    for mode, speculative in MODES.items():
                        runs = [stream_chat(url, PROMPTS[kind], args.max_tokens, speculative)
                                for _ in range(args.repeats)]
                        info = last_request(url)
                        ring = info.get("ring") or {}
                        row = {"nodes": n, "delay_ms": delay, "layout": args.layout, "mode": mode, "prompt": kind,
                               "tokens_per_second": median([r["tokens_per_second"] for r in runs]),
                               "runs": runs, "text": runs[-1]["text"],
                               "acceptance_rate": info["acceptance_rate"],
                               "mean_accepted_length": info["mean_accepted_length"],
                               "ring_passes": ring.get("passes"), "ring_wall_seconds": ring.get("wall_seconds"),
                               "ring_overhead_seconds": ring.get("overhead_seconds"),
                               "stage_compute_seconds": ring.get("compute_seconds"),
                               "stages": ring.get("stages"), "draft_time": info["draft_time"],
                               "pipeline_busy": info["pipeline_busy"], "pipeline_idle": info["pipeline_idle"]}
                        rows.append(row)
                        print(f"{n} nodes {delay:4g} ms {mode:11s} {kind:5s} {row['tokens_per_second']:5.2f} tok/s "
                              f"acceptance {row['acceptance_rate']:.2f} passes {row['ring_passes']} "
                              f"overhead {row['ring_overhead_seconds'] or 0:.1f} s", flush=True)
                        save("ring_decode.partial", {"rows": rows})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for row in rows:
        plain = next(r for r in rows if (r["nodes"], r["delay_ms"], r["prompt"], r["mode"]) ==
                     (row["nodes"], row["delay_ms"], row["prompt"], "plain ring"))
        sequential = next(r for r in rows if (r["nodes"], r["delay_ms"], r["prompt"], r["mode"]) ==
                          (row["nodes"], row["delay_ms"], row["prompt"], "sequential"))
        table.append({k: row[k] for k in ("nodes", "delay_ms", "layout", "mode", "prompt", "tokens_per_second",
                                          "acceptance_rate", "mean_accepted_length", "ring_passes",
                                          "ring_wall_seconds", "ring_overhead_seconds", "stage_compute_seconds",
                                          "draft_time", "pipeline_busy", "pipeline_idle")}
                     | {"vs_plain_ring": row["tokens_per_second"] / plain["tokens_per_second"],
                        "vs_sequential": row["tokens_per_second"] / sequential["tokens_per_second"],
                        "identical_to_plain": row["text"] == plain["text"]})
    return table


def plot(table: list[dict], prompt: str, name: str) -> None:
    plt = pyplot()
    rows = [r for r in table if r["prompt"] == prompt]
    setups, _, cells = table_cells(rows, lambda r: (r["nodes"], r["delay_ms"]))
    labels = [f"{n} node{'s' if n > 1 else ''}\n{d} ms" for n, d in setups]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    grouped_bars(axes[0], labels, {mode: [r["tokens_per_second"] for r in cells[mode]] for mode in MODES},
                 fontsize=8)
    axes[0].set_title(f"decode tokens/s ({prompt} prompt), per ring size and one-way hop delay")
    axes[0].legend(fontsize=8)
    sequential = [r for r in rows if r["mode"] == "sequential" and r["nodes"] > 1]
    plain = [r for r in rows if r["mode"] == "plain ring" and r["nodes"] > 1]
    for offset, group, label in ((0.0, plain, "plain"), (0.4, sequential, "spec")):
        xs = [i + offset for i in range(len(group))]
        compute = [sum(r["stage_compute_seconds"] or []) for r in group]
        overhead = [r["ring_overhead_seconds"] or 0 for r in group]
        axes[1].bar(xs, compute, 0.38, label=f"{label}: stage compute", alpha=0.9)
        axes[1].bar(xs, overhead, 0.38, bottom=compute, label=f"{label}: network + waiting", alpha=0.6)
    axes[1].set_xticks([i + 0.2 for i in range(len(sequential))],
                       [f"{r['nodes']}n {r['delay_ms']}ms" for r in sequential], fontsize=8)
    axes[1].set_title("seconds in the ring per request: plain vs speculative")
    axes[1].legend(fontsize=7)
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 5, 20, 50])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompts", nargs="+", default=["code"], choices=sorted(PROMPTS))
    parser.add_argument("--layout", choices=["even", "light-draft"], default="even")
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the given nodes/delays and merge them into the saved results")
    args = parser.parse_args()
    name = "ring_decode" if args.layout == "even" else f"ring_decode_{args.layout}"
    rows = measure(args)
    if args.update:
        def key(row: dict) -> tuple:
            return row["nodes"], row["delay_ms"], row["mode"], row["prompt"]
        fresh = {key(r) for r in rows}
        saved = json.loads((RESULTS / f"{name}.json").read_text())["runs"]
        rows = sorted([r for r in saved if key(r) not in fresh] + rows, key=lambda r: (r["nodes"], r["delay_ms"]))
    table = summarise(rows)
    save(name, {"machine": machine(), "args": vars(args), "summary": table, "runs": rows})
    (RESULTS / "ring_decode.partial.json").unlink(missing_ok=True)
    plot(table, args.prompts[0], name)
    for e in table:
        print(f"| {e['nodes']} | {e['delay_ms']:g} | {e['mode']} | {e['tokens_per_second']:.2f} | "
              f"{e['vs_plain_ring']:.2f}x | {e['vs_sequential']:.2f}x | {e['acceptance_rate']:.2f} | "
              f"{e['identical_to_plain']} |")


if __name__ == "__main__":
    main()

"""Concurrent clients through the real API: batched against unbatched, plain against speculative.

    .venv/bin/python bench/api_batching.py [--model qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--clients 1 2 4 8] [--max-tokens 64] [--rounds 2] [--batch 8] [--port 52480]

Each server is the real `exo` node (`python -m exo.main --enable-speculative ...`, uvicorn),
alone on the machine, with `--max-batch-size B` (batched) or `--max-batch-size 1` (unbatched,
what every request had before batching: they take turns on each engine's worker). Two servers
do not fit in memory with the 1.5B/0.5B pair, so the two settings alternate per round (the
order flipping each round); inside a server, for every client count the plain and speculative
runs alternate, their order flipping per count, so drift hits all of them. N clients each
stream one chat completion at once with the official `openai` client, greedy, each a different
prompt (a mix of the drafter benchmark's short kinds: code tasks, writing briefs, math
problems; the same prompt for client i at every N).

Per run: aggregate tokens/s (all completion tokens over the wall time from the first request
to the last answer), each request's tokens/s (its tokens over its own time), and time to first
token (p50 / p95 over the requests), and the decode rate after the first token (each request's,
summed). Every answer's text is checked against the unbatched
server's for the same prompt and mode (greedy, so it must be equal). Writes
bench/results/api_batching.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from common import NodeProcess, machine, median, pyplot, save, save_figure
from drafter_prompts import CODE_TASKS, MATH_PROBLEMS, WRITING_BRIEFS

MODES = ("plain", "speculative")


def prompts(n: int) -> list[str]:
    mixed = [p for trio in zip(CODE_TASKS, WRITING_BRIEFS, MATH_PROBLEMS) for p in trio]
    return [mixed[i % len(mixed)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Server:
    """One `exo` node in its own process, stopped with SIGINT (its own clean shutdown)."""

    def __init__(self, args: argparse.Namespace, batch: int):
        self.url = f"http://127.0.0.1:{args.port}/v1"
        command = [sys.executable, "-m", "exo.main", "--enable-speculative", "--default-model", args.model,
                   "--draft-model", args.draft, "--max-batch-size", str(batch), "--discovery-module", "none",
                   "--chatgpt-api-port", str(args.port), "--host", "127.0.0.1",
                   "--max-concurrent-requests", str(max(args.clients))]
        self.node = NodeProcess(command, f"/tmp/api_batching_server_{batch}.log", self.url.removesuffix("/v1"))
        self.wait_ready, self.stop = self.node.wait_ready, self.node.stop


def one_request(client, model: str, prompt: str, mode: str, max_tokens: int, out: dict) -> None:
    started = time.perf_counter()
    first = None
    text, tokens = [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"speculative": {"enabled": mode == "speculative"}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    out.update(started=started, ended=ended, first=first or ended, ttft=(first or ended) - started, tokens=tokens,
               text="".join(text))


def run_clients(url: str, model: str, n: int, mode: str, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", timeout=1800, max_retries=0)
    results = [dict() for _ in range(n)]
    threads = [threading.Thread(target=one_request, args=(client, model, p, mode, max_tokens, results[i]))
               for i, p in enumerate(prompts(n))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any("tokens" not in r or r["tokens"] is None for r in results):
        raise RuntimeError(f"a request failed: {results}")
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"clients": n, "mode": mode, "wall_s": wall, "tokens": total, "aggregate_tps": total / wall,
            "per_request_tps": [r["tokens"] / (r["ended"] - r["started"]) for r in results],
            # After the first token: the decode alone (prompt passes are compute-bound and gain
            # little from batching), summed over requests that decode at the same time.
            "decode_tps": sum((r["tokens"] - 1) / max(r["ended"] - r["first"], 1e-9) for r in results),
            "ttft_s": [r["ttft"] for r in results], "texts": [r["text"] for r in results]}


def measure(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for round_ in range(args.rounds):
        settings = [args.batch, 1] if round_ % 2 == 0 else [1, args.batch]
        for batch in settings:
            server = Server(args, batch)
            try:
                server.wait_ready()
                run_clients(server.url, args.model, 1, "speculative", 8)  # warm-up, untimed
                run_clients(server.url, args.model, 1, "plain", 8)
                for index, n in enumerate(args.clients):
                    for mode in (MODES if (index + round_) % 2 == 0 else MODES[::-1]):
                        row = {"round": round_, "batch": batch, **run_clients(server.url, args.model, n, mode,
                                                                            args.max_tokens)}
                        rows.append(row)
                        print(f"round {round_} batch {batch} clients {n} {mode}: {row['aggregate_tps']:.2f} tok/s "
                              f"aggregate, ttft p50 {median(row['ttft_s']):.2f} s", file=sys.stderr, flush=True)
            finally:
                server.stop()
    return rows


def summarise(rows: list[dict], batch: int) -> list[dict]:
    table = []
    clients = sorted({r["clients"] for r in rows})
    unbatched_text = {}
    for r in rows:
        if r["batch"] == 1:
            unbatched_text.setdefault((r["clients"], r["mode"]), r["texts"])
    for n in clients:
        for mode in MODES:
            for b in (batch, 1):
                cell = [r for r in rows if r["clients"] == n and r["mode"] == mode and r["batch"] == b]
                if not cell:
                    continue
                reference = unbatched_text.get((n, mode))
                table.append({
                    "clients": n, "mode": mode, "batched": b != 1,
                    "aggregate_tps": median([r["aggregate_tps"] for r in cell]),
                    "per_request_tps": median([median(r["per_request_tps"]) for r in cell]),
                    "decode_tps": median([r["decode_tps"] for r in cell]),
                    "ttft_p50_s": median([percentile(r["ttft_s"], 0.5) for r in cell]),
                    "ttft_p95_s": median([percentile(r["ttft_s"], 0.95) for r in cell]),
                    "identical_to_unbatched": all(r["texts"] == reference for r in cell) if reference else None,
                    "runs": len(cell)})
    base = {(e["clients"], e["mode"]): e["aggregate_tps"] for e in table if not e["batched"]}
    single_unbatched_spec = base.get((1, "speculative"))
    for e in table:
        e["vs_unbatched_same_mode"] = e["aggregate_tps"] / base[(e["clients"], e["mode"])] \
            if (e["clients"], e["mode"]) in base else None
        e["vs_unbatched_speculative_same_clients"] = e["aggregate_tps"] / base[(e["clients"], "speculative")] \
            if (e["clients"], "speculative") in base else None
        e["vs_one_unbatched_speculative_client"] = e["aggregate_tps"] / single_unbatched_spec \
            if single_unbatched_spec else None
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| clients | mode | batched | aggregate tok/s | decode tok/s | per request tok/s | TTFT p50 / p95 s | "
             "x unbatched (same mode) | equal texts |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        ratio = f"{e['vs_unbatched_same_mode']:.2f}" if e["vs_unbatched_same_mode"] else "-"
        lines.append(f"| {e['clients']} | {e['mode']} | {'yes' if e['batched'] else 'no'} | {e['aggregate_tps']:.2f} | "
                     f"{e['decode_tps']:.2f} | "
                     f"{e['per_request_tps']:.2f} | {e['ttft_p50_s']:.2f} / {e['ttft_p95_s']:.2f} | {ratio} | "
                     f"{e['identical_to_unbatched']} |")
    return "\n".join(lines)


def plot(table: list[dict]) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        for batched in (True, False):
            cell = sorted((e for e in table if e["mode"] == mode and e["batched"] == batched),
                          key=lambda e: e["clients"])
            if not cell:
                continue
            label = f"{mode}, {'batched' if batched else 'unbatched'}"
            style = "-" if batched else "--"
            left.plot([e["clients"] for e in cell], [e["aggregate_tps"] for e in cell], style, marker="o", label=label)
            right.plot([e["clients"] for e in cell], [e["ttft_p50_s"] for e in cell], style, marker="o", label=label)
    left.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="time to first token, p50 (s)", title="latency")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    save_figure(fig, "api_batching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="--max-batch-size of the batched server")
    parser.add_argument("--port", type=int, default=52480)
    parser.add_argument("--name", default="api_batching")
    args = parser.parse_args()
    rows = measure(args)
    table = summarise(rows, args.batch)
    path = save(args.name, {"machine": machine(), "args": vars(args), "table": table, "rows": rows})
    if args.name == "api_batching":
        plot(table)
    print(markdown(table))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Plain vs sequential vs pipelined speculation with draft and target on separate cores.

    .venv/bin/python bench/pipelined_decode.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--max-tokens 64] [--k 4]

Target and draft run in separate processes pinned to separate CPUs with one BLAS thread
each (`--placement processes`), the single-machine stand-in for a draft on another device.
Plain decoding is measured twice: the target alone with every core (what a user gets
without speculation) and pinned like in the speculative runs. Reports tokens/s, speed-ups,
acceptance and each side's busy/idle time. Writes bench/results/pipelined_decode.json/.png.
"""

from __future__ import annotations

import argparse
import gc
import time

import anyio

from common import grouped_bars, machine, pyplot, save, save_figure, table_cells
from speculative_decode import PROMPTS


async def measure(args: argparse.Namespace) -> list[dict]:
    import exo  # noqa: F401
    from exo.inference.generate import GenerationParams
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.inference.placement import make_engine_pair
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    rows = []
    setups = {
        "plain (all cores)": (lambda: (MLXInferenceEngine(), MLXInferenceEngine()), SpeculativeConfig()),
        "plain (pinned)": (lambda: make_engine_pair("processes"), SpeculativeConfig()),
        "sequential": (lambda: make_engine_pair("processes"), SpeculativeConfig(
            enabled=True, draft_model=args.draft, draft_tokens=args.k, adaptive_speculation=False,
            acceptance_threshold=0.0)),
        "pipelined": (lambda: make_engine_pair("processes"), SpeculativeConfig(
            enabled=True, draft_model=args.draft, draft_tokens=args.k, adaptive_speculation=False,
            acceptance_threshold=0.0, pipelined=True)),
    }
    for mode, (engines, config) in setups.items():
        engine = SpeculativeInferenceEngine(*engines(), config)
        shard = await engine.full_shard(args.target)
        await engine.ensure_shard(shard)
        for kind, text in PROMPTS.items():
            prompt = engine.tokenizer.encode(engine.tokenizer.chat_prompt([{"role": "user", "content": text}]))
            params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
            tokens, first_at = [], None
            async with engine.generate(shard, prompt, params, eos_ids=frozenset()) as blocks:
                async for block in blocks:
                    first_at = first_at or time.perf_counter()
                    tokens += block.tokens
            elapsed = time.perf_counter() - first_at
            m = engine.get_metrics()["last_request"]
            rows.append({"mode": mode, "prompt": kind, "tokens": tokens,
                         "decode_tokens_per_second": (len(tokens) - 1) / elapsed, "decode_seconds": elapsed,
                         "acceptance_rate": m["acceptance_rate"], "mean_accepted_length": m["mean_accepted_length"],
                         "draft_time": m["draft_time"], "verification_time": m["verification_time"],
                         "busy": m["pipeline_busy"], "idle": m["pipeline_idle"]})
            print(f"{mode:18s} {kind:5s} {rows[-1]['decode_tokens_per_second']:5.2f} tok/s "
                  f"acceptance {m['acceptance_rate']:.2f} busy {m['pipeline_busy']} idle {m['pipeline_idle']}",
                  flush=True)
        engine.close()
        del engine
        gc.collect()  # free this setup's weights before the next one loads
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        def rate(mode: str) -> float:
            return next(r["decode_tokens_per_second"] for r in rows if r["mode"] == mode and r["prompt"] == row["prompt"])
        plain = next(r for r in rows if r["mode"] == "plain (all cores)" and r["prompt"] == row["prompt"])
        out.append({"mode": row["mode"], "prompt": row["prompt"], "tokens_per_second": row["decode_tokens_per_second"],
                    "vs_plain_all_cores": row["decode_tokens_per_second"] / rate("plain (all cores)"),
                    "vs_sequential": row["decode_tokens_per_second"] / rate("sequential"),
                    "identical_to_plain": row["tokens"] == plain["tokens"],
                    "acceptance_rate": row["acceptance_rate"], "busy": row["busy"], "idle": row["idle"]})
    return out


def plot(table: list[dict]) -> None:
    plt = pyplot()
    prompts, _, cells = table_cells(table, lambda e: e["prompt"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    grouped_bars(axes[0], prompts, {mode: [e["tokens_per_second"] for e in entries]
                                    for mode, entries in cells.items()})
    axes[0].set_title("decode tokens/s")
    axes[0].legend(fontsize=8)
    pipelined = [e for e in table if e["mode"] == "pipelined"]
    labels = [f"{e['prompt']} {side}" for e in pipelined for side in ("draft", "verify")]
    busy = [e["busy"].get(side, 0) for e in pipelined for side in ("draft", "verify")]
    idle = [e["idle"].get(side, 0) for e in pipelined for side in ("draft", "verify")]
    axes[1].bar(labels, busy, label="busy")
    axes[1].bar(labels, idle, bottom=busy, label="idle")
    axes[1].set_title("pipelined: seconds busy / idle per side")
    axes[1].legend()
    save_figure(fig, "pipelined_decode")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    rows = anyio.run(measure, args)
    table = summarise(rows)
    save("pipelined_decode", {"machine": machine(), "args": vars(args), "summary": table, "runs": rows})
    plot(table)
    for e in table:
        print(f"| {e['prompt']} | {e['mode']} | {e['tokens_per_second']:.2f} | {e['vs_plain_all_cores']:.2f}x | "
              f"{e['vs_sequential']:.2f}x | {e['acceptance_rate']:.2f} | {e['identical_to_plain']} |")


if __name__ == "__main__":
    main()

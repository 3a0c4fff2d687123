"""tinygrad vs MLX on this CPU: plain decode speed and the speculative speed-up through each.

    .venv/bin/python bench/tinygrad_decode.py [--models qwen|smollm2] [--max-tokens 40]
        [--repeats 3] [--k 4] [--engines mlx tinygrad]

`qwen`: Qwen2.5-Coder 1.5B target, 0.5B draft (float32, ~10 GB per engine side).
`smollm2`: SmolLM2-135M target, its first 24 of 30 layers as the draft (a quick run).
Each engine runs in its own process (memory starts clean, one backend per process), target
and draft on the same engine. Per prompt and mode, one short untimed generation compiles
and warms every shape first; then `--repeats` greedy generations are timed and the median
decode speed (first token excluded, so prefill is not counted) is reported. Writes
bench/results/tinygrad_decode.json and .png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, grouped_bars, machine, pyplot, save, save_figure, table_cells

PROMPTS = {
    "code": "Write a Python function that merges two sorted lists into one sorted list. "
            "Include type hints and a docstring.",
    "prose": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
MODELS = {"qwen": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"), "smollm2": ("smollm2-135m", None)}


def side(args: argparse.Namespace) -> list[dict]:
    """Measure one engine (target and draft both on it) in this process."""
    import anyio

    import exo  # noqa: F401  (BLAS before mlx.core)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tools/ is not installed
    from tools.early_exit import make_early_exit
    from exo.inference.backends import make_engine
    from exo.inference.generate import GenerationParams
    from exo.inference.sources import model_dir_for
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    target_id, draft_id = MODELS[args.models]
    draft = draft_id or str(make_early_exit(model_dir_for(target_id), Path(tempfile.mkdtemp(prefix="exo-early-exit-")), 24))

    async def run() -> list[dict]:
        started = time.perf_counter()
        engine = SpeculativeInferenceEngine(make_engine(args.side), make_engine(args.side),
                                            SpeculativeConfig(enabled=True, draft_model=draft))
        shard = await engine.full_shard(target_id)
        await engine.ensure_shard(shard)
        load_seconds = time.perf_counter() - started
        modes = [("plain", SpeculativeConfig(enabled=False)),
                 (f"K={args.k}", SpeculativeConfig(enabled=True, draft_model=draft, draft_tokens=args.k,
                                                   max_speculation_depth=max(args.k, 1),
                                                   adaptive_speculation=False, acceptance_threshold=0.0)),
                 ("adaptive", SpeculativeConfig(enabled=True, draft_model=draft))]
        rows: list[dict] = []
        for kind, text in PROMPTS.items():
            prompt = engine.tokenizer.encode(engine.tokenizer.chat_prompt([{"role": "user", "content": text}]))
            for mode, config in modes:
                warm = GenerationParams(max_tokens=8, temperature=0.0)
                async with engine.generate(shard, prompt, warm, config, eos_ids=frozenset()) as blocks:
                    async for _ in blocks:
                        pass
                params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
                for repeat in range(args.repeats):
                    tokens, first_at = [], None
                    async with engine.generate(shard, prompt, params, config, eos_ids=frozenset()) as blocks:
                        async for block in blocks:
                            first_at = first_at or time.perf_counter()
                            tokens += block.tokens
                    elapsed = time.perf_counter() - first_at
                    m = engine.get_metrics()["last_request"]
                    row = {"engine": args.side, "mode": mode, "prompt": kind, "repeat": repeat, "tokens": tokens,
                           "decode_tokens_per_second": (len(tokens) - 1) / elapsed,
                           "acceptance_rate": m["acceptance_rate"],
                           "mean_accepted_length": m["mean_accepted_length"], "load_seconds": load_seconds}
                    rows.append(row)
                    partial_path(args.side).write_text(json.dumps(rows))
                    print(f"{args.side:8s} {kind:5s} {mode:8s} #{repeat} {row['decode_tokens_per_second']:6.2f} tok/s "
                          f"acceptance {row['acceptance_rate']:.2f}", file=sys.stderr, flush=True)
        engine.close()
        return rows

    return anyio.run(run)


def partial_path(engine: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"tinygrad_decode.{engine}.partial.json"


def summarise(rows: list[dict]) -> list[dict]:
    """Median tok/s per (engine, prompt, mode), speed-up vs the same engine's plain decoding,
    tinygrad/MLX ratio, and whether greedy tokens equal the MLX plain tokens."""
    table = []
    keys = list(dict.fromkeys((r["engine"], r["prompt"], r["mode"]) for r in rows))
    med = {k: statistics.median(r["decode_tokens_per_second"] for r in rows
                                if (r["engine"], r["prompt"], r["mode"]) == k) for k in keys}
    for engine, prompt, mode in keys:
        group = [r for r in rows if (r["engine"], r["prompt"], r["mode"]) == (engine, prompt, mode)]
        reference = next((r["tokens"] for r in rows if (r["engine"], r["prompt"], r["mode"]) == ("mlx", prompt, "plain")),
                         None)
        entry = {"engine": engine, "prompt": prompt, "mode": mode,
                 "decode_tokens_per_second": med[(engine, prompt, mode)],
                 "runs": [round(r["decode_tokens_per_second"], 3) for r in group],
                 "speedup_vs_plain": med[(engine, prompt, mode)] / med[(engine, prompt, "plain")],
                 "acceptance_rate": statistics.median(r["acceptance_rate"] for r in group),
                 "mean_accepted_length": statistics.median(r["mean_accepted_length"] for r in group),
                 "tokens_identical_to_mlx_plain": (all(r["tokens"] == reference for r in group)
                                                   if reference is not None else None)}
        if (other := med.get(("mlx", prompt, mode))) and engine == "tinygrad":
            entry["tinygrad_over_mlx"] = entry["decode_tokens_per_second"] / other
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| engine | prompt | mode | tok/s (median) | vs plain | acceptance | tokens/verify | tinygrad/MLX | "
             "same tokens as MLX plain |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        ratio = f"{e['tinygrad_over_mlx']:.2f}x" if "tinygrad_over_mlx" in e else "-"
        lines.append(f"| {e['engine']} | {e['prompt']} | {e['mode']} | {e['decode_tokens_per_second']:.2f} | "
                     f"{e['speedup_vs_plain']:.2f}x | {e['acceptance_rate']:.2f} | {e['mean_accepted_length']:.2f} | "
                     f"{ratio} | {e['tokens_identical_to_mlx_plain']} |")
    return "\n".join(lines)


def plot(table: list[dict], title: str) -> None:
    plt = pyplot()
    groups, modes, picks = table_cells(table, lambda e: (e["engine"], e["prompt"]))
    labels = [f"{engine}\n{prompt}" for engine, prompt in groups]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, name in zip(axes, ("decode_tokens_per_second", "speedup_vs_plain"),
                             ("decode tokens/s (median)", "speed-up vs the same engine's plain decoding")):
        grouped_bars(ax, labels, {mode: [p[key] if p else 0 for p in picks[mode]] for mode in modes})
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, "tinygrad_decode")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", choices=sorted(MODELS), default="qwen")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="fixed draft block size measured besides adaptive K")
    parser.add_argument("--engines", nargs="+", choices=["mlx", "tinygrad"], default=["mlx", "tinygrad"])
    parser.add_argument("--side", choices=["mlx", "tinygrad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    rows: list[dict] = []
    load_before = os.getloadavg()  # the CPU is shared: say how busy it was
    for engine in args.engines:
        partial_path(engine).unlink(missing_ok=True)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", engine], check=True)
        rows += json.loads(partial_path(engine).read_text())
    table = summarise(rows)
    target, draft = MODELS[args.models]
    save("tinygrad_decode", {"machine": machine(),
                             "args": {k: v for k, v in vars(args).items() if k != "side"},
                             "target": target, "draft": draft or f"{target} first 24 layers",
                             "load_average_before": load_before, "load_average_after": os.getloadavg(),
                             "summary": table, "runs": rows})
    plot(table, f"{target} / draft {draft or 'early exit'}, greedy, {args.max_tokens} tokens")
    print(markdown(table))


if __name__ == "__main__":
    main()

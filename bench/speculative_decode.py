"""Speculative decoding vs plain decoding vs mlx-lm's own speculative decoding, one run.

    .venv/bin/python bench/speculative_decode.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--max-tokens 64] [--temps 0 0.7] [--ks 2 4 6]

Each side runs in its own process (the pair needs ~10 GB per copy): first this project's
engine (plain, fixed K, adaptive K), then mlx-lm's `stream_generate` (plain and
`draft_model=` at the same K values) on the same token ids. Decode speed excludes prefill.
Writes bench/results/speculative_decode.json and .png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import grouped_bars, machine, partial_writer, pyplot, run_sides, save, save_figure, table_cells

PROMPTS = {
    "code": "Write a Python function that merges two sorted lists into one sorted list. "
            "Include type hints and a docstring.",
    "prose": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def our_side(args: argparse.Namespace) -> list[dict]:
    import anyio

    import exo  # noqa: F401
    from exo.inference.generate import GenerationParams
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    async def run() -> list[dict]:
        engine = SpeculativeInferenceEngine(MLXInferenceEngine(), MLXInferenceEngine(),
                                            SpeculativeConfig(enabled=True, draft_model=args.draft))
        shard = await engine.full_shard(args.target)
        await engine.ensure_shard(shard)
        modes = [("plain", SpeculativeConfig(enabled=False))]
        modes += [(f"K={k}", SpeculativeConfig(enabled=True, draft_model=args.draft, draft_tokens=k,
                                               max_speculation_depth=max(k, 1), adaptive_speculation=False,
                                               acceptance_threshold=0.0)) for k in args.ks]
        modes += [("adaptive", SpeculativeConfig(enabled=True, draft_model=args.draft))]
        rows: list[dict] = []
        keep = partial_writer("speculative_decode", "exo", rows, report)
        for kind, text in PROMPTS.items():
            prompt = engine.tokenizer.encode(engine.tokenizer.chat_prompt([{"role": "user", "content": text}]))
            for temp in args.temps:
                params = GenerationParams(max_tokens=args.max_tokens, temperature=temp, seed=0)
                for mode, config in modes:
                    tokens, first_at = [], None
                    async with engine.generate(shard, prompt, params, config, eos_ids=frozenset()) as blocks:
                        async for block in blocks:
                            first_at = first_at or time.perf_counter()
                            tokens += block.tokens
                    elapsed = time.perf_counter() - first_at
                    m = engine.get_metrics()["last_request"]
                    keep({"engine": "exo", "mode": mode, "prompt": kind, "temperature": temp,
                                 "tokens": tokens, "decode_tokens_per_second": (len(tokens) - 1) / elapsed,
                                 "acceptance_rate": m["acceptance_rate"],
                                 "mean_accepted_length": m["mean_accepted_length"],
                                 "per_position_acceptance": m["per_position_acceptance"],
                                 "k_histogram": m["k_histogram"], "draft_time": m["draft_time"],
                                 "verification_time": m["verification_time"]})
        engine.close()
        return rows

    return anyio.run(run)


def mlx_lm_side(args: argparse.Namespace) -> list[dict]:
    import exo  # noqa: F401  (BLAS before mlx)
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from exo.inference.sources import model_dir_for
    from exo.inference.tokenizer import load_tokenizer

    target_dir, draft_dir = model_dir_for(args.target), model_dir_for(args.draft)
    model, tokenizer = load(str(target_dir))
    draft, _ = load(str(draft_dir))
    ours = load_tokenizer(target_dir)
    rows: list[dict] = []
    keep = partial_writer("speculative_decode", "mlx-lm", rows, report)
    for kind, text in PROMPTS.items():
        prompt = ours.encode(ours.chat_prompt([{"role": "user", "content": text}]))
        for temp in args.temps:
            for k in [0, *args.ks]:
                import mlx.core as mx

                mx.random.seed(0)
                tokens, first_at, drafted_hits = [], None, 0
                extra = {"draft_model": draft, "num_draft_tokens": k} if k else {}
                for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                                sampler=make_sampler(temp), **extra):
                    first_at = first_at or time.perf_counter()
                    tokens.append(response.token)
                    drafted_hits += bool(getattr(response, "from_draft", False))
                elapsed = time.perf_counter() - first_at
                keep({"engine": "mlx-lm", "mode": f"K={k}" if k else "plain", "prompt": kind,
                             "temperature": temp, "tokens": tokens,
                             "decode_tokens_per_second": (len(tokens) - 1) / elapsed,
                             "tokens_from_draft": drafted_hits})
    return rows


def report(row: dict) -> None:
    extra = f" acceptance {row['acceptance_rate']:.2f}" if "acceptance_rate" in row else ""
    print(f"{row['engine']:7s} {row['prompt']:5s} T={row['temperature']:<4} {row['mode']:9s} "
          f"{row['decode_tokens_per_second']:6.2f} tok/s{extra}", file=sys.stderr, flush=True)


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for row in (r for r in rows if r["engine"] == "exo"):
        key = (row["prompt"], row["temperature"])
        plain = next(r for r in rows if r["engine"] == "exo" and r["mode"] == "plain" and (r["prompt"], r["temperature"]) == key)
        same_k = [r for r in rows if r["engine"] == "mlx-lm" and r["mode"] == row["mode"] and (r["prompt"], r["temperature"]) == key]
        entry = {k: row[k] for k in ("prompt", "temperature", "mode", "decode_tokens_per_second")}
        entry["speedup_vs_plain"] = row["decode_tokens_per_second"] / plain["decode_tokens_per_second"]
        entry["acceptance_rate"] = row["acceptance_rate"]
        entry["mean_accepted_length"] = row["mean_accepted_length"]
        entry["greedy_identical_to_plain"] = row["tokens"] == plain["tokens"] if row["temperature"] == 0 else None
        if same_k:
            entry["mlx_lm_tokens_per_second"] = same_k[0]["decode_tokens_per_second"]
            entry["ratio_vs_mlx_lm_same_k"] = row["decode_tokens_per_second"] / same_k[0]["decode_tokens_per_second"]
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| prompt | T | mode | tok/s | vs plain | acceptance | tokens/verify | mlx-lm tok/s | vs mlx-lm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        mlx = e.get("mlx_lm_tokens_per_second")
        mlx_cells = f"{mlx:.2f} | {e['ratio_vs_mlx_lm_same_k']:.2f}x" if mlx else "- | -"
        lines.append(f"| {e['prompt']} | {e['temperature']} | {e['mode']} | {e['decode_tokens_per_second']:.2f} | "
                     f"{e['speedup_vs_plain']:.2f}x | {e['acceptance_rate']:.2f} | {e['mean_accepted_length']:.2f} | "
                     f"{mlx_cells} |")
    return "\n".join(lines)


def plot(table: list[dict]) -> None:
    plt = pyplot()
    groups, modes, picks = table_cells(table, lambda e: (e["prompt"], e["temperature"]))
    labels = [f"{p} T={t}" for p, t in groups]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    positions = grouped_bars(axes[0], labels, {f"exo {mode}": [p["decode_tokens_per_second"] if p else 0
                                                               for p in picks[mode]] for mode in modes})
    grouped_bars(axes[1], labels, {mode: [p["acceptance_rate"] if p else 0 for p in picks[mode]] for mode in modes})
    for j, (mode, xs) in enumerate(zip(modes, positions)):
        mlx = [p.get("mlx_lm_tokens_per_second") if p else None for p in picks[mode]]
        axes[0].scatter([x for x, v in zip(xs, mlx) if v], [v for v in mlx if v], color="black", marker="_", s=200,
                        label="mlx-lm same K" if j == 0 else None, zorder=3)
    for ax, title in zip(axes, ("decode tokens/s (bars: exo; black ticks: mlx-lm at the same K)", "acceptance rate")):
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    save_figure(fig, "speculative_decode")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temps", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--reuse", nargs="*", default=[], choices=["exo", "mlx-lm"],
                        help="reuse a side's rows from its last (partial) run instead of measuring again")
    parser.add_argument("--side", choices=["exo", "mlx-lm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        our_side(args) if args.side == "exo" else mlx_lm_side(args)
        return
    rows = run_sides("speculative_decode", __file__, ("exo", "mlx-lm"), args.reuse)
    table = summarise(rows)
    save("speculative_decode", {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "side"},
                                "summary": table, "runs": rows})
    plot(table)
    print(markdown(table))


if __name__ == "__main__":
    main()

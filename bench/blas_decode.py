"""Decode and prefill speed of plain generation per model under each CPU BLAS.

    .venv/bin/python bench/blas_decode.py [--models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
                                          [--blas openblas blis none] [--repeats 3] [--max-tokens 48]

Writes bench/results/blas_decode.json and .png. Each run is a fresh process (EXO_BLAS only
takes effect before mlx.core loads); medians over the repeats.
"""

from __future__ import annotations

import argparse

from common import exo_run_json, grouped_bars, machine, median, pyplot, save, save_figure, table_cells

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    parser.add_argument("--blas", nargs="+", default=["openblas", "blis", "none"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for blas in args.blas:
            runs = [exo_run_json(model, PROMPT, env={"EXO_BLAS": blas}, max_tokens=args.max_tokens,
                                 extra=["--seed", "0"]) for _ in range(args.repeats)]
            row = {"model": model, "blas": blas,
                   "decode_tokens_per_second": median([r["decode_tokens_per_second"] for r in runs]),
                   "prefill_seconds": median([r["prefill_seconds"] for r in runs]),
                   "prompt_tokens": runs[0]["prompt_tokens"], "runs": len(runs),
                   "token_ids": runs[0]["token_ids"]}
            rows.append(row)
            print(f"{model:22s} {blas:9s} decode {row['decode_tokens_per_second']:6.2f} tok/s  "
                  f"prefill {row['prefill_seconds']:6.2f} s ({row['prompt_tokens']} tokens)", flush=True)
    reference = {}
    for row in rows:
        reference.setdefault(row["model"], row["token_ids"])
    for row in rows:
        # Different BLAS kernels round differently; greedy text may diverge late in float32.
        row["same_tokens_as_first_blas"] = row.pop("token_ids") == reference[row["model"]]
    save("blas_decode", {"machine": machine(), "max_tokens": args.max_tokens, "rows": rows})
    plot(rows)


def plot(rows: list[dict]) -> None:
    plt = pyplot()
    models, _, cells = table_cells(rows, lambda r: r["model"], "blas")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("decode_tokens_per_second", "prefill_seconds"),
                              ("decode tokens/s (higher is better)", "prefill seconds (lower is better)")):
        grouped_bars(ax, models, {blas: [r[key] for r in runs] for blas, runs in cells.items()}, fontsize=8)
        ax.set_title(title)
        ax.legend()
    save_figure(fig, "blas_decode")


if __name__ == "__main__":
    main()

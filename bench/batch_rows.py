"""What one forward pass over B requests' rows costs against B passes of one request each:
the measurement batched speculation (B concurrent requests per pass) rests on.

    .venv/bin/python bench/batch_rows.py [--model qwen2.5-coder-1.5b] [--batches 1 2 4 8]
        [--lengths 1 5] [--context 256] [--repeats 5]

One process, exo's MLX engine and BLAS (the few-row kernel over OpenBLAS). B rows at the same
cache offset (`--context` tokens each, one batched mlx-lm KV cache per layer) run passes of
T tokens per row (1: a plain or draft step, K + 1: a verify block), trimmed back after each,
the batch sizes interleaved per repeat so drift hits them all. Rows at different offsets (what
a real batch holds) would add padding and a mask on top: this is the cost's floor for
pad-and-mask and the exact cost of per-row caches at equal lengths. Writes
bench/results/batch_rows.json and .png.
"""

from __future__ import annotations

import argparse
import time

from common import machine, median, pyplot, save, save_figure


def measure(model: str, batches: list[int], lengths: list[int], context: int, repeats: int) -> dict:
    import anyio
    import numpy as np

    import exo  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    from exo.blas import select_blas
    from exo.inference.mlx.engine import MLXInferenceEngine

    async def run() -> dict:
        engine = MLXInferenceEngine()
        shard = await engine.full_shard(model)
        await engine.ensure_shard(shard)
        caches = {}

        def prefill(b: int) -> None:
            caches[b] = engine.model.make_cache()
            rows = mx.array(np.tile(np.arange(1000, 1000 + context, dtype=np.int32), (b, 1)))
            mx.eval(engine.model(rows, caches[b], 1))

        def step(b: int, t: int) -> float:
            rows = mx.array(np.tile(np.arange(2000, 2000 + t, dtype=np.int32), (b, 1)))
            started = time.perf_counter()
            mx.eval(engine.model(rows, caches[b], t))
            seconds = time.perf_counter() - started
            for layer in caches[b]:
                layer.trim(t)
            return seconds

        for b in batches:
            await engine._run(prefill, b)
        samples: dict[str, list[float]] = {f"{b}x{t}": [] for b in batches for t in lengths}
        for t in lengths:
            for b in batches:  # allocate every shape once, untimed
                await engine._run(step, b, t)
        for r in range(repeats):
            order = batches if r % 2 == 0 else batches[::-1]
            for t in lengths:
                for b in order:
                    samples[f"{b}x{t}"].append(await engine._run(step, b, t))
        engine.close()
        return {"blas": select_blas().name, "samples": samples}

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    measured = measure(args.model, args.batches, args.lengths, args.context, args.repeats)
    table = []
    for t in args.lengths:
        one = median(measured["samples"][f"1x{t}"])
        for b in args.batches:
            seconds = median(measured["samples"][f"{b}x{t}"])
            table.append({"rows": b, "tokens_per_row": t, "pass_seconds": seconds,
                          "vs_one_row": seconds / one, "batched_vs_separate": seconds / (b * one),
                          "row_tokens_per_second": b * t / seconds})
    save("batch_rows", {"machine": machine(), "args": vars(args), "blas": measured["blas"], "table": table,
                        "samples": measured["samples"]})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in args.lengths:
        rows = [e for e in table if e["tokens_per_row"] == t]
        ax.plot([e["rows"] for e in rows], [e["pass_seconds"] for e in rows], "o-", label=f"batched, {t} token(s)/row")
        ax.plot([e["rows"] for e in rows], [e["rows"] * rows[0]["pass_seconds"] for e in rows], "x--",
                label=f"separate passes, {t} token(s)/row")
    ax.set_xlabel("requests (rows) per pass")
    ax.set_ylabel("seconds")
    ax.set_title(f"{args.model}: one batched pass vs one pass per request")
    ax.legend(fontsize=8)
    save_figure(fig, "batch_rows")
    print("| rows | tokens/row | pass s | vs 1 row | batched / separate |")
    print("|---|---|---|---|---|")
    for e in table:
        print(f"| {e['rows']} | {e['tokens_per_row']} | {e['pass_seconds']:.3f} | {e['vs_one_row']:.2f}x | "
              f"{e['batched_vs_separate']:.2f} |")


if __name__ == "__main__":
    main()

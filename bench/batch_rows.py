"""What one forward pass over B requests' rows costs against B passes of one request each,
and which layout batching should use: the measurement batched speculation rests on.

    .venv/bin/python bench/batch_rows.py [--model qwen2.5-coder-1.5b] [--batches 1 2 4 8]
        [--lengths 1 5] [--context 256] [--repeats 5]

One process, exo's MLX engine and BLAS. Passes of T tokens per row (1: a plain or draft step,
K + 1: a verify block), trimmed back after each, batch sizes and layouts interleaved per repeat
so drift hits them all. Two layouts:

- "padded": one batched mlx-lm KV cache per layer, every row at the same offset (`--context`).
  That is pad-and-mask's floor: real rows sit at different offsets, which adds padded
  positions to every row's attention, a mask, and a copy of the batch's caches whenever a
  request joins or leaves.
- "packed": what exo runs (`exo/inference/mlx/packed.py`): each request its own cache at its
  own offset (`--context` + 37 i), rows laid end to end, attention per row, through the
  engine's `_forward_rows` (rows grouped within the few-row kernel's exact bound).

Writes bench/results/batch_rows.json and .png.
"""

from __future__ import annotations

import argparse
import time

from common import machine, median, pyplot, save, save_figure

LAYOUTS = ("padded", "packed")


def measure(model: str, batches: list[int], lengths: list[int], context: int, repeats: int) -> dict:
    import anyio
    import numpy as np

    import exo  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    from exo.blas import select_blas
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.inference.threaded import StepRow

    async def run() -> dict:
        engine = MLXInferenceEngine()
        shard = await engine.full_shard(model)
        await engine.ensure_shard(shard)
        padded, packed = {}, {}

        def prefill(b: int) -> None:
            padded[b] = engine.model.make_cache()
            rows = mx.array(np.tile(np.arange(1000, 1000 + context, dtype=np.int32), (b, 1)))
            mx.eval(engine.model(rows, padded[b], 1))
            packed[b] = []
            for i in range(b):
                cache = engine._make_cache()
                prompt = np.arange(1000, 1000 + context + 37 * i, dtype=np.int64)[None]
                engine._forward_rows([(StepRow(f"p{i}", prompt, 1, None), cache)])
                packed[b].append(cache)

        def step(layout: str, b: int, t: int) -> float:
            tokens = np.arange(2000, 2000 + t, dtype=np.int64)
            started = time.perf_counter()
            if layout == "padded":
                mx.eval(engine.model(mx.array(np.tile(tokens.astype(np.int32), (b, 1))), padded[b], t))
                seconds = time.perf_counter() - started
                for layer in padded[b]:
                    layer.trim(t)
            else:
                engine._forward_rows([(StepRow(f"p{i}", tokens[None], t, None), cache)
                                      for i, cache in enumerate(packed[b])])
                seconds = time.perf_counter() - started
                for cache in packed[b]:
                    cache.trim(t)
            return seconds

        for b in batches:
            await engine._run(prefill, b)
        samples: dict[str, list[float]] = {f"{layout}:{b}x{t}": [] for layout in LAYOUTS for b in batches
                                           for t in lengths}
        for layout in LAYOUTS:
            for t in lengths:
                for b in batches:  # allocate every shape once, untimed
                    await engine._run(step, layout, b, t)
        for r in range(repeats):
            order = batches if r % 2 == 0 else batches[::-1]
            for t in lengths:
                for b in order:
                    for layout in (LAYOUTS if (r + b) % 2 == 0 else LAYOUTS[::-1]):
                        samples[f"{layout}:{b}x{t}"].append(await engine._run(step, layout, b, t))
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
        one = median(measured["samples"][f"packed:1x{t}"])  # one request alone, as exo runs it
        for b in args.batches:
            padded = median(measured["samples"][f"padded:{b}x{t}"])
            seconds = median(measured["samples"][f"packed:{b}x{t}"])
            table.append({"rows": b, "tokens_per_row": t, "pass_seconds": seconds, "padded_floor_seconds": padded,
                          "packed_vs_padded": seconds / padded, "vs_one_row": seconds / one,
                          "batched_vs_separate": seconds / (b * one), "row_tokens_per_second": b * t / seconds})
    save("batch_rows", {"machine": machine(), "args": vars(args), "blas": measured["blas"], "table": table,
                        "samples": measured["samples"]})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in args.lengths:
        rows = [e for e in table if e["tokens_per_row"] == t]
        ax.plot([e["rows"] for e in rows], [e["pass_seconds"] for e in rows], "o-", label=f"packed, {t} token(s)/row")
        ax.plot([e["rows"] for e in rows], [e["padded_floor_seconds"] for e in rows], "s:",
                label=f"padded floor, {t} token(s)/row")
        ax.plot([e["rows"] for e in rows], [e["rows"] * rows[0]["pass_seconds"] for e in rows], "x--",
                label=f"separate passes, {t} token(s)/row")
    ax.set_xlabel("requests (rows) per pass")
    ax.set_ylabel("seconds")
    ax.set_title(f"{args.model}: one batched pass vs one pass per request")
    ax.legend(fontsize=8)
    save_figure(fig, "batch_rows")
    print("| rows | tokens/row | packed pass s | padded floor s | packed / padded | vs 1 row | batched / separate |")
    print("|---|---|---|---|---|---|---|")
    for e in table:
        print(f"| {e['rows']} | {e['tokens_per_row']} | {e['pass_seconds']:.3f} | {e['padded_floor_seconds']:.3f} | "
              f"{e['packed_vs_padded']:.2f} | {e['vs_one_row']:.2f}x | {e['batched_vs_separate']:.2f} |")


if __name__ == "__main__":
    main()

"""One forward pass by input length (1 = a decode or draft step, K + 1 = a verify) under each
CPU BLAS: what speculative decoding's costs are made of.

    .venv/bin/python bench/blas_rows.py [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
        [--blas auto openblas blis] [--rounds 2] [--context 600]

`auto` is exo's few-row kernel over OpenBLAS (exo/native/small_gemm.c). Each (round, BLAS)
is a fresh process (the BLAS is chosen before mlx.core loads); the BLAS order rotates every
round so drift hits all of them. Every pass runs after a `--context`-token prompt and is
trimmed off again. Writes bench/results/blas_rows.json and .png; prints a Markdown table of
medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import machine, median, pyplot, save, save_figure

LENGTHS = (1, 2, 3, 5, 9, 17, 33)


def measure(models: list[str], context: int, repeats: int) -> dict:
    """In this process (its BLAS already chosen): seconds per pass by length, per model."""
    import time

    import anyio
    import numpy as np

    import exo  # noqa: F401  (BLAS before mlx)
    from exo.blas import select_blas
    from exo.inference.engine import last_only
    from exo.inference.mlx.engine import MLXInferenceEngine

    async def run() -> dict:
        out = {"blas": select_blas().name, "models": {}}
        for model in models:
            engine = MLXInferenceEngine()
            shard = await engine.full_shard(model)
            await engine.ensure_shard(shard)
            prompt = np.arange(1000, 1000 + context)[None]
            started = time.perf_counter()
            await engine.infer_tensor("bench", shard, prompt, last_only())
            timings = {"prefill": time.perf_counter() - started}
            for n in LENGTHS:
                samples = []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    await engine.infer_tensor("bench", shard, np.arange(2000, 2000 + n)[None], last_only(n))
                    samples.append(time.perf_counter() - started)
                    engine.trim_cache("bench", n)
                timings[str(n)] = samples[1:]  # the first pass at a new length allocates
            engine.close()
            out["models"][model] = timings
        return out

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    parser.add_argument("--blas", nargs="+", default=["auto", "openblas", "blis"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.models, args.context, args.repeats)))
        return
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    names: dict[str, str] = {}
    for turn in range(args.rounds):
        for blas in args.blas[turn % len(args.blas):] + args.blas[:turn % len(args.blas)]:
            done = subprocess.run([sys.executable, __file__, "--child", "--models", *args.models,
                                   "--context", str(args.context), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, env={**os.environ, "EXO_BLAS": blas}, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            names[blas] = result["blas"]
            for model, timings in result["models"].items():
                for key, values in timings.items():
                    bucket = samples.setdefault(blas, {}).setdefault(model, {}).setdefault(key, [])
                    bucket.extend(values if isinstance(values, list) else [values])
            print(f"round {turn} {blas} ({result['blas']}) done", file=sys.stderr, flush=True)
    table = [{"blas": blas, "library": names[blas], "model": model,
              "prefill_seconds": median(t["prefill"]),
              "seconds_by_length": {n: median(t[str(n)]) for n in LENGTHS}}
             for blas, by_model in samples.items() for model, t in by_model.items()]
    save("blas_rows", {"machine": machine(), "args": vars(args), "table": table, "samples": samples})
    plot(table)
    print("| model | BLAS | prefill | " + " | ".join(f"{n} tok" for n in LENGTHS) + " |")
    print("|---|---|---|" + "---|" * len(LENGTHS))
    for e in table:
        print(f"| {e['model']} | {e['library']} | {e['prefill_seconds']:.1f} s | "
              + " | ".join(f"{1000 * e['seconds_by_length'][n]:.0f} ms" for n in LENGTHS) + " |")


def plot(table: list[dict]) -> None:
    plt = pyplot()
    models = list(dict.fromkeys(e["model"] for e in table))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for e in (e for e in table if e["model"] == model):
            ax.plot(LENGTHS, [1000 * e["seconds_by_length"][n] for n in LENGTHS], "o-", label=e["library"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the pass")
        ax.set_ylabel("ms per forward pass")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, "blas_rows")


if __name__ == "__main__":
    main()

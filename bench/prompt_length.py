"""Does speculation survive long prompts? ~30, ~300 and ~1,500 prompt tokens, one process.

    .venv/bin/python bench/prompt_length.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--max-tokens 64] [--lengths 30 300 1500] [--ks 2 3 4] [--repeats 1] [--categories ...]

Prompts are built from text nobody here wrote: Python standard-library modules of this
machine's Python ("explain this code", "add type hints to this code") and Python's own
LICENSE.txt ("summarise this passage"), cut at line boundaries to the wanted length. For
each prompt the modes run interleaved in ONE process on ONE copy of the weights: plain
decoding, ours adaptive (sequential), ours pipelined, and mlx-lm's own speculative decoding
(`stream_generate(..., draft_model=, num_draft_tokens=K)`) at every K, driving an
`mlx_lm` model whose parameters are our engine's arrays (no second copy in memory).
Decode speed excludes the prefill. Writes bench/results/prompt_length.json and .png and
prints a Markdown table (best mlx-lm K per prompt).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import sysconfig
import time
from pathlib import Path

from common import machine, median, pyplot, save, save_figure

# (category, instruction, source file of the passage) -- the passage is public text.
CATEGORIES = [
    ("explain", "Explain what this Python code does, function by function.", "textwrap.py"),
    ("type-hints", "Add type hints to this Python code. Reply with the code only.", "heapq.py"),
    ("summarise", "Summarise this license text in a few sentences.", "LICENSE.txt"),
]


def passage_lines(filename: str) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = stdlib / filename
    text = path.read_text(encoding="utf-8")
    if filename.endswith(".py"):  # skip the license header and module docstring noise at the top
        import ast

        body = ast.parse(text).body
        first = next((node.lineno for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))), 1)
        text = "\n".join(text.splitlines()[first - 1:])
    return text.splitlines()


def build_prompt(tokenizer, instruction: str, lines: list[str], target: int, code: bool) -> list[int]:
    """The chat prompt with as many whole lines of the passage as keep it near `target` tokens."""

    def encode(n: int) -> list[int]:
        body = "\n".join(lines[:n])
        content = f"{instruction}\n\n```python\n{body}\n```" if code else f"{instruction}\n\n{body}"
        return tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": content}]))

    lo, hi = 1, len(lines)
    while lo < hi:  # the largest n whose prompt is at most `target` tokens (at least one line)
        mid = (lo + hi + 1) // 2
        if len(encode(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return encode(lo)


def mlx_lm_twin(engine):
    """An mlx_lm model over our engine's parameter arrays (shared, not copied)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from exo.inference.mlx.sharded_model import architecture_for

    ours = engine.model
    config = __import__("json").loads((engine.model_dir / "config.json").read_text())
    arch = architecture_for(config)
    twin = arch.Model(arch.ModelArgs.from_dict(config))
    params = dict(tree_flatten(ours.parameters()))
    renamed = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in params.items()}
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(twin, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda path, _: f"{path}.scales" in renamed)
    twin.update(tree_unflatten(list(renamed.items())))
    mine = dict(tree_flatten(twin.parameters()))
    assert set(mine) == set(renamed), sorted(set(mine) ^ set(renamed))[:5]
    assert all(mine[k] is renamed[k] for k in mine)  # the very same arrays
    return twin


def mlx_lm_tokenizer(model_dir: Path):
    from mlx_lm.tokenizer_utils import load

    return load(model_dir)


def timed(tokens_and_times: list[tuple[int, float]]) -> tuple[list[int], float]:
    tokens = [t for t, _ in tokens_and_times]
    if len(tokens) < 2:
        return tokens, 0.0
    return tokens, (len(tokens) - 1) / (tokens_and_times[-1][1] - tokens_and_times[0][1])


async def run(args: argparse.Namespace) -> dict:
    import exo  # noqa: F401  (BLAS before mlx)
    from mlx_lm.sample_utils import make_sampler

    from exo.inference.generate import GenerationParams
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    stream_generate = sys.modules["mlx_lm.generate"].stream_generate
    engine = SpeculativeInferenceEngine(MLXInferenceEngine(), MLXInferenceEngine(),
                                        SpeculativeConfig(enabled=True, draft_model=args.draft))
    shard = await engine.full_shard(args.target)
    await engine.ensure_shard(shard)
    target, draft = mlx_lm_twin(engine.target), mlx_lm_twin(engine.draft)
    lm_tokenizer = mlx_lm_tokenizer(engine.target.model_dir)
    tokenizer = engine.tokenizer
    ours = {
        "plain": SpeculativeConfig(enabled=False),
        "adaptive": SpeculativeConfig(enabled=True, draft_model=args.draft),
        "pipelined": SpeculativeConfig(enabled=True, draft_model=args.draft, pipelined=True),
    }
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    runs: list[dict] = []
    # One untimed warm-up per mode, so no mode pays for first-call compilation.
    warm = tokenizer.encode("Hello")
    for config in ours.values():
        async with engine.generate(shard, warm, GenerationParams(max_tokens=4), config, eos_ids=frozenset()) as blocks:
            async for _ in blocks:
                pass
    for _ in stream_generate(target, lm_tokenizer, warm, max_tokens=4, draft_model=draft, num_draft_tokens=2):
        pass
    for category, instruction, source in [c for c in CATEGORIES if c[0] in args.categories]:
        lines = passage_lines(source)
        for length in args.lengths:
            prompt = build_prompt(tokenizer, instruction, lines, length, source.endswith(".py"))
            for repeat in range(args.repeats):
                for mode, config in ours.items():
                    stamped: list[tuple[int, float]] = []
                    async with engine.generate(shard, prompt, params, config, eos_ids=frozenset()) as blocks:
                        async for block in blocks:
                            now = time.perf_counter()
                            stamped += [(t, now) for t in block.tokens]
                    tokens, rate = timed(stamped)
                    m = engine.get_metrics()["last_request"]
                    runs.append({"category": category, "length": length, "prompt_tokens": len(prompt),
                                 "repeat": repeat, "mode": mode, "tokens": tokens, "tokens_per_second": rate,
                                 "k_histogram": m["k_histogram"], "acceptance_rate": m["acceptance_rate"],
                                 "mean_accepted_length": m["mean_accepted_length"],
                                 "draft_prefill_time": m["draft_prefill_time"], "draft_time": m["draft_time"],
                                 "verification_time": m["verification_time"]})
                    report(runs[-1])
                for k in args.ks:
                    stamped, from_draft = [], 0
                    for response in stream_generate(target, lm_tokenizer, prompt, max_tokens=args.max_tokens,
                                                    draft_model=draft, num_draft_tokens=k,
                                                    sampler=make_sampler(0.0)):
                        stamped.append((response.token, time.perf_counter()))
                        from_draft += bool(getattr(response, "from_draft", False))
                    tokens, rate = timed(stamped)
                    runs.append({"category": category, "length": length, "prompt_tokens": len(prompt),
                                 "repeat": repeat, "mode": f"mlx-lm K={k}", "tokens": tokens,
                                 "tokens_per_second": rate, "tokens_from_draft": from_draft})
                    report(runs[-1])
    engine.close()
    return {"machine": machine(), "args": vars(args), "summary": summarise(runs), "runs": runs}


def report(row: dict) -> None:
    print(f"{row['category']:10s} {row['prompt_tokens']:5d} tok  {row['mode']:12s} "
          f"{row['tokens_per_second']:7.2f} tok/s  K={row.get('k_histogram', '-')}", file=sys.stderr, flush=True)


def summarise(runs: list[dict]) -> list[dict]:
    """Per prompt: median tokens/s of each mode, speed-up vs plain, identity, best mlx-lm K."""
    table = []
    for key in dict.fromkeys((r["category"], r["length"]) for r in runs):
        rows = [r for r in runs if (r["category"], r["length"]) == key]
        plain_rows = [r for r in rows if r["mode"] == "plain"]
        plain_rate = median([r["tokens_per_second"] for r in plain_rows])
        reference = plain_rows[0]["tokens"]
        entry = {"category": key[0], "length": key[1], "prompt_tokens": rows[0]["prompt_tokens"],
                 "plain_tokens_per_second": plain_rate, "modes": {}}
        for mode in dict.fromkeys(r["mode"] for r in rows):
            picked = [r for r in rows if r["mode"] == mode]
            rate = median([r["tokens_per_second"] for r in picked])
            info = {"tokens_per_second": rate, "speedup_vs_plain": rate / plain_rate if plain_rate else 0.0,
                    # mlx-lm stops at EOS; ours ran the full budget: compare what both produced.
                    "greedy_identical_to_plain": all(r["tokens"] == reference[:len(r["tokens"])] for r in picked)}
            if "k_histogram" in picked[0]:
                histogram: dict[str, int] = {}
                for r in picked:
                    for k, n in r["k_histogram"].items():
                        histogram[str(k)] = histogram.get(str(k), 0) + n
                info.update(k_histogram=histogram,
                            acceptance_rate=median([r["acceptance_rate"] for r in picked]),
                            mean_accepted_length=median([r["mean_accepted_length"] for r in picked]))
            entry["modes"][mode] = info
        mlx = {m: v for m, v in entry["modes"].items() if m.startswith("mlx-lm")}
        if mlx:
            entry["best_mlx_lm"] = max(mlx, key=lambda m: mlx[m]["tokens_per_second"])
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| category | prompt tokens | plain tok/s | adaptive | pipelined | best mlx-lm | adaptive K histogram "
             "| acceptance | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        modes = e["modes"]
        best = e.get("best_mlx_lm")
        best_cell = f"{modes[best]['speedup_vs_plain']:.2f}x ({best[7:]})" if best else "-"
        identical = all(v["greedy_identical_to_plain"] for v in modes.values())
        lines.append(f"| {e['category']} | {e['prompt_tokens']} | {e['plain_tokens_per_second']:.2f} | "
                     f"{modes['adaptive']['speedup_vs_plain']:.2f}x | {modes['pipelined']['speedup_vs_plain']:.2f}x | "
                     f"{best_cell} | {modes['adaptive']['k_histogram']} | "
                     f"{modes['adaptive']['acceptance_rate']:.2f} | {'yes' if identical else 'NO'} |")
    return "\n".join(lines)


def plot(table: list[dict], stem: str) -> None:
    plt = pyplot()
    categories = list(dict.fromkeys(e["category"] for e in table))
    fig, axes = plt.subplots(1, len(categories), figsize=(5 * len(categories), 4), squeeze=False)
    for ax, category in zip(axes[0], categories):
        entries = [e for e in table if e["category"] == category]
        xs = [e["prompt_tokens"] for e in entries]
        for mode in ("adaptive", "pipelined"):
            ax.plot(xs, [e["modes"][mode]["speedup_vs_plain"] for e in entries], marker="o", label=f"ours {mode}")
        ax.plot(xs, [e["modes"][e["best_mlx_lm"]]["speedup_vs_plain"] if e.get("best_mlx_lm") else float("nan")
                     for e in entries], marker="s", linestyle="--", label="mlx-lm best K")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(f"{category}: decode speed-up vs plain", fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=inspect.getdoc(sys.modules[__name__]).splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[30, 300, 1500])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--categories", nargs="+", default=[c[0] for c in CATEGORIES],
                        choices=[c[0] for c in CATEGORIES], help="prompt kinds to run (default: all)")
    parser.add_argument("--out", default="prompt_length", help="result file stem under bench/results")
    args = parser.parse_args()
    import anyio

    payload = anyio.run(run, args)
    save(args.out, payload)
    plot(payload["summary"], args.out)
    print(markdown(payload["summary"]))


if __name__ == "__main__":
    main()

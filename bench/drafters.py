"""Drafters compared on seven kinds of request: plain, model (adaptive K), suffix, hybrid,
and mlx-lm's own speculative decoding at its best K, in one run.

    .venv/bin/python bench/drafters.py [--per-category 4] [--max-tokens 64] [--temps 0]
        [--seeds 0] [--mlx-lm-ks 2 4] [--categories "code editing" ...] [--name drafters]
        [--reuse exo mlx-lm] [--resume] [--engine mlx|tinygrad] [--no-mlx-lm]

Each side runs in its own process (the pair needs ~10 GB per copy): this project's engine
first, every mode interleaved per prompt (so drift hits all of them), then mlx-lm's
`stream_generate` (plain and `draft_model=` at each K) on the same token ids. Decode speed
excludes the target's prompt pass but not the draft's: this project emits the first token
before the draft's prompt pass (the hybrid defers it to the model's first block), so that pass
lies inside our decode time, and mlx-lm's speculative runs are charged the same pass (timed
once per prompt) on top of their decode time. mlx-lm's side computes each prompt's KV caches
once and trims them back after every run (its runs then start from the same cache, as ours
start from a fresh prompt pass). `--resume` keeps the rows of an interrupted run and measures only the rest.
`--engine tinygrad` runs this project's side on
tinygrad (plain, suffix and hybrid; mlx-lm has no tinygrad side). The exo side also measures the target's verify cost by block
length, and replays the suffix drafter over the greedy plain outputs for a grid of its
settings (greedy acceptance is exact token equality, so the replay needs no model): that is
the evidence behind the suffix defaults. Writes bench/results/drafters.json and .png and
prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time

from common import RESULTS, grouped_bars, machine, median, partial_writer, pyplot, run_sides, save, save_figure
from drafter_prompts import build

MODES = ["plain", "model", "suffix", "hybrid"]
TINYGRAD_MODES = ["plain", "suffix", "hybrid"]  # the model draft alone loses on tinygrad here (see README)


def modes_for(engine: str) -> list[str]:
    return TINYGRAD_MODES if engine == "tinygrad" else MODES


def our_side(args: argparse.Namespace) -> None:
    import anyio
    import numpy as np

    import exo  # noqa: F401  (BLAS before mlx)
    from exo.inference.backends import make_engine
    from exo.inference.generate import GenerationParams
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    rows: list[dict] = []
    keep = partial_writer(args.name, "exo", rows, report, args.resume)
    done = {cell_key(r) for r in rows}
    costs_path = RESULTS / f"{args.name}.costs.partial.json"

    async def verify_costs(engine, shard, prompt) -> dict[int, float]:
        """Median seconds of one target pass over n new tokens after a ~prompt-long cache."""
        target, costs = engine.target, {}
        await target.infer_tensor("cost", shard, np.asarray([prompt]))
        base = target.cache_offset("cost")
        for n in (1, 2, 3, 5, 9, 17, 33, 65):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                await target.infer_tensor("cost", shard, np.asarray([prompt[:n]]))
                times.append(time.perf_counter() - started)
                target.trim_cache("cost", target.cache_offset("cost") - base)
            costs[n] = float(np.median(times))
        target.free_cache("cost")
        return costs

    async def run() -> None:
        engine = SpeculativeInferenceEngine(make_engine(args.engine), make_engine(args.engine),
                                            SpeculativeConfig(enabled=True, draft_model=args.draft))
        modes = modes_for(args.engine)
        shard = await engine.full_shard(args.target)
        await engine.ensure_shard(shard)
        tokenizer = engine.tokenizer
        configs = {"plain": SpeculativeConfig(enabled=False)}
        configs |= {mode: SpeculativeConfig(enabled=True, draft_model=args.draft, drafter=mode)
                    for mode in modes[1:]}
        prompts = selected_prompts(args)
        warm = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": "hi"}]))
        for config in configs.values():  # first calls compile and page in: not measured
            async with engine.generate(shard, warm, GenerationParams(max_tokens=4), config) as blocks:
                async for _ in blocks:
                    pass
        if not (args.resume and costs_path.exists()):
            first = build(1)["code editing"][0]
            costs = await verify_costs(engine, shard, tokenizer.encode(
                tokenizer.chat_prompt([{"role": "user", "content": first}])))
            print(f"verify cost by length: {costs}", file=sys.stderr, flush=True)
            costs_path.write_text(json.dumps(costs))
        turn = 0
        for category, messages in prompts.items():
            for index, message in enumerate(messages):
                prompt = tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": message}]))
                for temp, seed in itertools.product(args.temps, args.seeds if any(args.temps) else [0]):
                    if temp == 0 and seed != (args.seeds or [0])[0]:
                        continue
                    params = GenerationParams(max_tokens=args.max_tokens, temperature=temp, seed=seed)
                    order = modes[turn % len(modes):] + modes[:turn % len(modes)]  # rotate who goes first
                    turn += 1
                    for mode in order:
                        if (category, index, temp, seed, mode) in done:
                            continue
                        tokens, first_at = [], None
                        async with engine.generate(shard, prompt, params, configs[mode]) as blocks:
                            async for block in blocks:
                                first_at = first_at or time.perf_counter()
                                tokens += block.tokens
                        elapsed = time.perf_counter() - first_at
                        m = engine.get_metrics()["last_request"]
                        keep({"engine": "exo", "backend": args.engine, "mode": mode, "category": category, "prompt": index,
                              "prompt_tokens": len(prompt), "temperature": temp, "seed": seed, "tokens": tokens,
                              "decode_tokens_per_second": (len(tokens) - 1) / elapsed if elapsed > 0 else 0.0,
                              "draft_prefill_seconds": m["draft_prefill_time"],
                              "acceptance_rate": m["acceptance_rate"],
                              "tokens_per_verify": m["mean_accepted_length"], "per_drafter": m["per_drafter"],
                              "k_histogram": m["k_histogram"]})
        engine.close()

    anyio.run(run)


def mlx_lm_side(args: argparse.Namespace) -> None:
    import exo  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from exo.inference.sources import model_dir_for
    from exo.inference.tokenizer import load_tokenizer

    target_dir, draft_dir = model_dir_for(args.target), model_dir_for(args.draft)
    model, tokenizer = load(str(target_dir))
    draft, _ = load(str(draft_dir))
    ours = load_tokenizer(target_dir)
    rows: list[dict] = []
    keep = partial_writer(args.name, "mlx-lm", rows, report, args.resume)
    done = {cell_key(r) for r in rows}

    def prefilled(prompt: list[int]) -> tuple[list, list, float]:
        """Target and draft caches holding all of `prompt` but its last token, and the seconds
        the draft's pass took (what every speculative run of mlx-lm pays before decoding)."""
        caches, seconds = (make_prompt_cache(model), make_prompt_cache(draft)), 0.0
        for net, cache in zip((model, draft), caches):
            started = time.perf_counter()
            net(mx.array([prompt[:-1]]), cache=cache)
            mx.eval([c.state for c in cache])
            seconds = time.perf_counter() - started
        return (*caches, seconds)

    for category, messages in selected_prompts(args).items():
        for index, message in enumerate(messages):
            prompt = ours.encode(ours.chat_prompt([{"role": "user", "content": message}]))
            wanted = [(temp, k) for temp in args.temps for k in [0, *args.mlx_lm_ks]
                      if (category, index, temp, 0, f"K={k}" if k else "plain") not in done]
            if not wanted:
                continue
            target_cache, draft_cache, draft_prefill = prefilled(prompt)
            for temp, k in wanted:
                mx.random.seed(0)
                tokens, first_at = [], None
                extra = ({"draft_model": draft, "num_draft_tokens": k, "prompt_cache": target_cache + draft_cache}
                         if k else {"prompt_cache": target_cache})
                for response in stream_generate(model, tokenizer, prompt[-1:], max_tokens=args.max_tokens,
                                                sampler=make_sampler(temp), **extra):
                    first_at = first_at or time.perf_counter()
                    tokens.append(response.token)
                elapsed = time.perf_counter() - first_at
                for cache in (target_cache, draft_cache):  # back to the prompt (less its last token)
                    trim_prompt_cache(cache, cache[0].offset - (len(prompt) - 1))
                keep({"engine": "mlx-lm", "mode": f"K={k}" if k else "plain", "category": category,
                      "prompt": index, "temperature": temp, "seed": 0, "tokens": tokens,
                      "decode_tokens_per_second": (len(tokens) - 1) / elapsed if elapsed > 0 else 0.0,
                      "draft_prefill_seconds": draft_prefill if k else 0.0})


def selected_prompts(args: argparse.Namespace) -> dict[str, list[str]]:
    prompts = build(args.per_category)
    unknown = set(args.categories or ()) - set(prompts)
    if unknown:
        raise SystemExit(f"unknown categories {sorted(unknown)}; known: {list(prompts)}")
    return {c: ms for c, ms in prompts.items() if not args.categories or c in args.categories}


def cell_key(row: dict) -> tuple:
    """What one measured row covers (a resumed run skips it)."""
    return row["category"], row["prompt"], row["temperature"], row.get("seed", 0), row["mode"]


def report(row: dict) -> None:
    print(f"{row['engine']:7s} {row['category']:20s} #{row['prompt']} T={row['temperature']:<4} "
          f"{row['mode']:7s} {row['decode_tokens_per_second']:6.2f} tok/s", file=sys.stderr, flush=True)


# -- the replay: suffix settings on recorded greedy outputs -------------------------------------
def replay(rows: list[dict], prompts: dict[str, list[list[int]]], costs: dict[int, float]) -> list[dict]:
    """Expected speed-up over plain of the suffix mode for a grid of its settings, per
    category: copies under the hybrid's policy of when and how much to copy (the suffix
    mode's own), no model. Every block keeps the longest prefix equal to the recorded greedy
    output and costs one verify of its length (interpolated from the measured costs)."""
    import numpy as np

    from exo.inference.generate import GenerationParams
    from exo.speculative.adaptive import AdaptiveK
    from exo.speculative.drafters.hybrid import HybridDrafter
    from exo.speculative.drafters.suffix import SuffixDrafter

    async def speedup(prompt: list[int], truth: list[int], suffix: SuffixDrafter) -> float:
        controller = AdaptiveK(suffix.max_depth, 4)
        for n, seconds in costs.items():  # measured costs, as a request inheriting them starts with
            for _ in range(2):  # (the first sample per length is a warm-up, not kept)
                controller.observe_verify(n, seconds)
        cost = controller.verify_cost  # interpolated between measured lengths, as the policy prices them
        drafter = HybridDrafter(None, suffix, controller)
        await drafter.prefill("replay", prompt)
        committed, spent = list(prompt) + truth[:1], 0.0
        drafter.accept("replay", len(committed))
        params, rng = GenerationParams(max_tokens=len(truth)), np.random.default_rng(0)
        while len(committed) < len(prompt) + len(truth):
            block = (await drafter.propose("replay", committed, suffix.max_depth, params, 0.0, rng)).tokens
            done = len(committed) - len(prompt)
            kept = 0
            while kept < len(block) and done + kept < len(truth) and block[kept] == truth[done + kept]:
                kept += 1
            spent += cost(len(block) + 1)
            committed += truth[done:done + kept + 1]
            drafter.accept("replay", len(committed))
        return (len(truth) - 1) * cost(1) / spent

    out = []
    plain = [r for r in rows if r["engine"] == "exo" and r["mode"] == "plain" and r["temperature"] == 0]
    for min_match, factor, resync in itertools.product((1, 2, 3), (0.5, 1.0, 2.0), (False, True)):
        per_category: dict[str, list[float]] = {}
        for row in plain:
            suffix = SuffixDrafter(min_match=min_match, length_rule=lambda m, f=factor: math.ceil(f * m),
                                   resync=resync)
            per_category.setdefault(row["category"], []).append(asyncio.run(
                speedup(prompts[row["category"]][row["prompt"]], row["tokens"], suffix)))
        out.append({"min_match": min_match, "factor": factor, "resync": resync,
                    "median_speedup": {c: median(v) for c, v in per_category.items()},
                    "geomean_over_categories": math.exp(sum(math.log(median(v)) for v in per_category.values())
                                                        / len(per_category))})
    return sorted(out, key=lambda r: -r["geomean_over_categories"])


def speed(row: dict, cell: list[dict], with_draft_prefill: bool = True) -> float:
    """A row's tokens per second after the target's prompt pass. Ours include the draft's
    prompt pass already; mlx-lm's get it added (from the row, or, for rows measured before
    it was recorded, from our model mode's pass over the same prompt with the same draft)."""
    if row["engine"] != "mlx-lm" or row["mode"] == "plain" or not with_draft_prefill:
        return row["decode_tokens_per_second"]
    seconds = row.get("draft_prefill_seconds")
    if seconds is None:
        seconds = next(r["draft_prefill_seconds"] for r in cell if r["engine"] == "exo" and r["mode"] == "model"
                       and r["prompt"] == row["prompt"])
    n = len(row["tokens"]) - 1
    return n / (n / row["decode_tokens_per_second"] + seconds)


def summarise(rows: list[dict]) -> list[dict]:
    """Per category and temperature: median speed-up over plain (per prompt and seed, then the
    median), acceptance and tokens per verify; mlx-lm's best K by its median speed-up."""
    table = []
    keys = sorted({(r["category"], r["temperature"]) for r in rows}, key=lambda k: (k[1], list(build(1)).index(k[0])))
    for category, temp in keys:
        cell = [r for r in rows if r["category"] == category and r["temperature"] == temp]

        def speedups(engine: str, mode: str, with_draft_prefill: bool = True) -> list[float]:
            out = []
            for r in (r for r in cell if r["engine"] == engine and r["mode"] == mode):
                base = next(p for p in cell if p["engine"] == engine and p["mode"] == "plain"
                            and p["prompt"] == r["prompt"] and p.get("seed") == r.get("seed"))
                out.append(speed(r, cell, with_draft_prefill) / base["decode_tokens_per_second"])
            return out

        entry = {"category": category, "temperature": temp}
        for mode in [m for m in MODES[1:] if any(r["mode"] == m for r in cell)]:
            mine = [r for r in cell if r["engine"] == "exo" and r["mode"] == mode]
            entry[mode] = {"speedup": median(speedups("exo", mode)),
                           "acceptance": median([r["acceptance_rate"] for r in mine]),
                           "tokens_per_verify": median([r["tokens_per_verify"] for r in mine])}
            if temp == 0:
                plain = {r["prompt"]: r["tokens"] for r in cell if r["engine"] == "exo" and r["mode"] == "plain"}
                entry[mode]["greedy_identical"] = all(r["tokens"] == plain[r["prompt"]] for r in mine)
        ks = sorted({r["mode"] for r in cell if r["engine"] == "mlx-lm" and r["mode"] != "plain"})
        if ks:
            best = max(ks, key=lambda k: median(speedups("mlx-lm", k)))
            entry["mlx_lm_best"] = {"k": best, "speedup": median(speedups("mlx-lm", best)),
                                    "speedup_without_draft_prefill": median(speedups("mlx-lm", best, False))}
            if temp == 0:  # both engines' greedy plain decoding of the same token ids
                theirs = {r["prompt"]: r["tokens"] for r in cell if r["engine"] == "mlx-lm" and r["mode"] == "plain"}
                entry["mlx_lm_plain_identical"] = all(
                    r["tokens"] == theirs[r["prompt"]] for r in cell
                    if r["engine"] == "exo" and r["mode"] == "plain" and r["prompt"] in theirs)
            entry["plain_exo_vs_mlx_lm"] = median([
                r["decode_tokens_per_second"] / next(p["decode_tokens_per_second"] for p in cell
                                                     if p["engine"] == "mlx-lm" and p["mode"] == "plain"
                                                     and p["prompt"] == r["prompt"])
                for r in cell if r["engine"] == "exo" and r["mode"] == "plain" and r.get("seed", 0) == 0])
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| category | T | model | suffix | hybrid | mlx-lm best K (without its draft's prompt pass) | "
             "hybrid vs mlx-lm | "
             "hybrid acceptance | hybrid tokens/verify |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        mlx = e.get("mlx_lm_best")
        # Speed-ups are each engine over its own plain decoding; the ratio puts both on exo's plain.
        versus = (e["hybrid"]["speedup"] * e["plain_exo_vs_mlx_lm"] / mlx["speedup"]) if mlx else None
        cells = " | ".join(f"{e[m]['speedup']:.2f}x" if m in e else "-" for m in MODES[1:])
        lines.append(f"| {e['category']} | {e['temperature']} | {cells} | "
                     + (f"{mlx['speedup']:.2f}x ({mlx['speedup_without_draft_prefill']:.2f}x), {mlx['k']} | "
                        f"{versus:.2f}x | " if mlx else "- | - | ")
                     + f"{e['hybrid']['acceptance']:.2f} | {e['hybrid']['tokens_per_verify']:.2f} |")
    return "\n".join(lines)


def plot(table: list[dict], name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(13, 4.5))
    labels = [f"{e['category']}\nT={e['temperature']}" for e in table]
    series = {mode: [e[mode]["speedup"] if mode in e else 0 for e in table] for mode in MODES[1:]}
    series["mlx-lm best K"] = [e["mlx_lm_best"]["speedup"] if "mlx_lm_best" in e else 0 for e in table]
    grouped_bars(ax, labels, series)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_title("median decode speed-up over each engine's plain decoding", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temps", type=float, nargs="+", default=[0.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mlx-lm-ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--engine", choices=["mlx", "tinygrad"], default="mlx",
                        help="this project's backend (tinygrad: no mlx-lm side)")
    parser.add_argument("--no-mlx-lm", action="store_true", help="this project's side only")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    parser.add_argument("--name", default="drafters", help="stem of the results files")
    parser.add_argument("--reuse", nargs="*", default=[], choices=["exo", "mlx-lm"],
                        help="reuse a side's rows from its last (partial) run instead of measuring again")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an interrupted run and measure only what they lack")
    parser.add_argument("--side", choices=["exo", "mlx-lm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        our_side(args) if args.side == "exo" else mlx_lm_side(args)
        return
    chosen = selected_prompts(args)
    sides = ("exo", "mlx-lm") if args.engine == "mlx" and not args.no_mlx_lm else ("exo",)
    rows = [r for r in run_sides(args.name, __file__, sides, args.reuse, args.resume)
            if r["category"] in chosen and r["prompt"] < len(chosen[r["category"]])]
    table = summarise(rows)
    costs = {int(n): c for n, c in json.loads((RESULTS / f"{args.name}.costs.partial.json").read_text()).items()}
    from exo.inference.sources import model_dir_for
    from exo.inference.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir_for(args.target))
    encoded = {c: [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": m}])) for m in ms]
               for c, ms in chosen.items()}
    grid = replay(rows, encoded, costs) if any(r["temperature"] == 0 for r in rows) else []  # greedy outputs only
    save(args.name, {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "side"},
                      "summary": table, "verify_costs": costs, "suffix_replay": grid, "runs": rows})
    plot(table, args.name)
    print(markdown(table))
    print("\nsuffix settings by replay (top 5, geometric mean over categories of the median speed-up):")
    for g in grid[:5]:
        print(f"  min_match={g['min_match']} factor={g['factor']} resync={g['resync']}: "
              f"{g['geomean_over_categories']:.2f}x", {c: round(v, 2) for c, v in g["median_speedup"].items()})


if __name__ == "__main__":
    main()

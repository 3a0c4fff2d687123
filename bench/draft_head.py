"""The draft model with a restricted output head (`draft_vocab`): step time and acceptance
per subset size.

    .venv/bin/python bench/draft_head.py [--sizes 0 65536 32768 16384 8192] [--steps 24]

- Step time: one draft decode step (a 1-token forward after a ~900-token prompt, as in a
  real block) for each size, sizes interleaved round by round (4 timed steps each) so
  drift hits all of them.
- Coverage: the share of the tokens in every benchmark prompt (bench/drafter_prompts.py)
  whose id is inside the subset: a token outside can never be drafted.
- Acceptance (greedy): where bench/results/drafters.json holds the target's plain greedy
  outputs, the draft runs teacher-forced over prompt + output once, and for each size the
  share of output positions where the draft's argmax over the subset equals the target's
  token (greedy acceptance per position: exact for greedy verification).

Writes bench/results/draft_head.json and .png; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import RESULTS, machine, median, pyplot, save, save_figure
from drafter_prompts import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 65536, 32768, 16384, 8192])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()

    import anyio
    import numpy as np

    import exo  # noqa: F401  (BLAS before mlx)
    from exo.inference.engine import HEAD_ROWS, last_only
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.drafters import draft_head_rows

    async def run() -> dict:
        engine = MLXInferenceEngine()
        shard = await engine.full_shard(args.draft)
        await engine.ensure_shard(shard)
        tokenizer = engine.tokenizer
        heads = {size: draft_head_rows(SpeculativeConfig(draft_vocab=size), engine) for size in args.sizes}
        prompts = {c: [tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": m}])) for m in ms]
                   for c, ms in build(4).items()}

        context = prompts["code editing"][0]
        await engine.infer_tensor("step", shard, np.asarray([context]), last_only())
        base = engine.cache_offset("step")
        times: dict[int, list[float]] = {size: [] for size in args.sizes}
        rounds = max(1, args.steps // 4)
        for turn in range(rounds + 1):
            for size in args.sizes[turn % len(args.sizes):] + args.sizes[:turn % len(args.sizes)]:
                state = last_only() | ({HEAD_ROWS: heads[size]} if heads[size] else {})
                for step in range(5):  # the engine keeps one gathered head: the first step gathers it
                    started = time.perf_counter()
                    await engine.infer_tensor("step", shard, np.asarray([[context[step]]]), state)
                    if turn and step:  # round 0 pages the weights in
                        times[size].append(time.perf_counter() - started)
                    engine.trim_cache("step", engine.cache_offset("step") - base)
        engine.free_cache("step")

        every = [t for ts in prompts.values() for p in ts for t in p]
        coverage = {size: float(np.mean([t < heads[size].first or t in heads[size].extra for t in every]))
                    if heads[size] else 1.0 for size in args.sizes}

        agreement: dict[int, dict[str, float]] = {}
        outputs = _plain_outputs()
        if outputs:
            hits = {size: {} for size in args.sizes}
            for (category, index), output in sorted(outputs.items()):
                prompt = prompts[category][index]
                sequence = prompt + output
                logits, _ = await engine.infer_tensor("tf", shard, np.asarray([sequence[:-1]]),
                                                      last_only(len(output)))
                engine.free_cache("tf")
                rows = logits[0]
                for size in args.sizes:
                    ids = heads[size].ids() if heads[size] else np.arange(rows.shape[-1])
                    guess = ids[np.argmax(rows[:, ids], axis=-1)]
                    hits[size].setdefault(category, []).extend((guess == np.asarray(output)).tolist())
            agreement = {size: {c: float(np.mean(h)) for c, h in by.items()} for size, by in hits.items()}
        engine.close()
        return {"times": times, "coverage": coverage, "agreement": agreement,
                "rows": {size: heads[size].size if heads[size] else len(tokenizer) for size in args.sizes}}

    measured = anyio.run(run)
    table = []
    for size in args.sizes:
        agree = measured["agreement"].get(size, {})
        table.append({"draft_vocab": size, "rows": measured["rows"][size],
                      "step_ms": 1000 * median(measured["times"][size]),
                      "prompt_token_coverage": measured["coverage"][size],
                      "greedy_agreement": agree,
                      "greedy_agreement_mean": float(sum(agree.values()) / len(agree)) if agree else None})
    save("draft_head", {"machine": machine(), "args": vars(args), "table": table, "raw": measured})
    plot(table)
    print("| draft_vocab | head rows | draft step | vs full | prompt-token coverage | greedy agreement |")
    print("|---|---|---|---|---|---|")
    full = next(e for e in table if e["draft_vocab"] == 0)["step_ms"] if 0 in args.sizes else None
    for e in table:
        versus = f"{e['step_ms'] / full:.2f}" if full else "-"
        agree = f"{e['greedy_agreement_mean']:.3f}" if e["greedy_agreement_mean"] is not None else "-"
        print(f"| {e['draft_vocab'] or 'all'} | {e['rows']} | {e['step_ms']:.0f} ms | {versus} | "
              f"{e['prompt_token_coverage']:.4f} | {agree} |")


def _plain_outputs() -> dict[tuple[str, int], list[int]]:
    """The target's plain greedy outputs per (category, prompt) from the drafters benchmark."""
    path = RESULTS / "drafters.json"
    if not path.exists():
        print("no bench/results/drafters.json: acceptance is not measured", file=sys.stderr)
        return {}
    runs = json.loads(path.read_text()).get("runs", [])
    return {(r["category"], r["prompt"]): r["tokens"] for r in runs
            if r["engine"] == "exo" and r["mode"] == "plain" and r["temperature"] == 0 and r["tokens"]}


def plot(table: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [str(e["draft_vocab"] or "all") for e in table]
    ax.bar(labels, [e["step_ms"] for e in table], color="#4c72b0")
    ax.set_ylabel("draft step (ms)")
    ax.set_xlabel("draft_vocab (head rows)")
    if any(e["greedy_agreement_mean"] is not None for e in table):
        twin = ax.twinx()
        twin.plot(labels, [e["greedy_agreement_mean"] or 0 for e in table], "o-", color="#c44e52")
        twin.set_ylabel("greedy agreement with the target")
    ax.set_title("restricted draft head: step time and acceptance", fontsize=10)
    save_figure(fig, "draft_head")


if __name__ == "__main__":
    main()

"""What a suffix-drafter block costs: propose + indexing the block's committed tokens, at 1k/8k/32k contexts.

    .venv/bin/python bench/suffix_cost.py [--contexts 1024 8192 32768] [--blocks 400] [--windows 3] [--k 32]

No model and no tokenizer: token ids come from text nobody here wrote, the Python
standard-library sources of this machine's Python (concatenated in sorted path order),
read two ways, plus a control without repeats:

  source-bytes  every byte is a token (256 ids: long repeats, dense automaton)
  source-words  every word, run of spaces or punctuation mark is a token (ids by first use)
  random        uniform ids below 32,000 (almost nothing repeats)

For each context length and workload, `--windows` windows of the source: the drafter
takes the first `context` tokens as its prompt (timed apart, as prefill), then the rest of
the window is the "target": each block is proposed after the committed sequence, checked
against the source (the matching prefix is accepted, then the source's next token is
emitted, as rejection sampling at temperature 0 would), and accepted. Two drivings:

  sequential  propose, verify, accept(base + accepted), every block
  pipelined   up to 2 blocks in flight proposed on committed + in-flight tokens, accept only
              on a divergence (as exo.speculative.pipeline.pipelined does)

A block's cost is the wall time of its propose (which indexes the tokens committed since
the last one) plus its accept, through the coroutine the schedulers await. Writes
bench/results/suffix_cost.json; prints the medians to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's exo, not an installed one

from common import machine, median, save  # noqa: E402

from exo.inference.generate import GenerationParams  # noqa: E402
from exo.speculative.drafters.suffix import SuffixDrafter  # noqa: E402

PARAMS = GenerationParams()
MAX_IN_FLIGHT = 2


def stdlib_text(limit: int) -> tuple[str, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, files, size = [], [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        files.append(path.name)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts), files


def workloads(need: int) -> tuple[dict[str, list[int]], list[str]]:
    import random

    text, files = stdlib_text(need * 8)
    ids: dict[str, int] = {}
    words = [ids.setdefault(w, len(ids)) for w in re.findall(r"\w+|\s+|[^\w\s]", text)]
    data = text.encode("utf-8")
    rng = random.Random(0)
    return {"source-bytes": list(data), "source-words": words,
            "random": [rng.randrange(32000) for _ in range(need)]}, files


def call(coroutine):
    """Run a coroutine that never waits (the drafter's) to completion, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the drafter awaited something")


def verify(truth: list[int], committed: list[int], block: list[int]) -> tuple[list[int], int]:
    """The source as the target: accept the matching prefix, emit the source's next token."""
    base = len(committed)
    accepted = 0
    while accepted < len(block) and block[accepted] == truth[base + accepted]:
        accepted += 1
    return block[:accepted] + [truth[base + accepted]], accepted


def run_window(truth: list[int], context: int, blocks: int, k: int, mode: str) -> dict:
    drafter = SuffixDrafter()
    rid = "bench"
    started = time.perf_counter()
    call(drafter.prefill(rid, truth[:context]))
    prefill_s = time.perf_counter() - started
    committed = truth[:context + 1]  # the target's prefill emits one token
    costs, proposed, accepted_total, matches = [], 0, 0, []
    perf = time.perf_counter
    if mode == "sequential":
        for _ in range(blocks):
            t0 = perf()
            block = call(drafter.propose(rid, committed, k, PARAMS, 0.0, None))
            if block.tokens:
                emitted, accepted = verify(truth, committed, block.tokens)
                t1 = perf()
                drafter.accept(rid, block.base_length + accepted)
                costs.append(perf() - t1 + (t1 - t0))
            else:
                costs.append(perf() - t0)
                emitted, accepted = [truth[len(committed)]], 0
            proposed += len(block.tokens)
            accepted_total += accepted
            matches.append(drafter.last_match(rid))
            committed += emitted
    else:
        sequence, in_flight = list(committed), []
        while len(costs) < blocks:
            t0 = perf()
            block = call(drafter.propose(rid, sequence, k, PARAMS, 0.0, None))
            cost = perf() - t0
            matches.append(drafter.last_match(rid))
            proposed += len(block.tokens)
            if block.tokens:
                sequence += block.tokens
                in_flight.append(block)
            if not block.tokens or len(in_flight) >= MAX_IN_FLIGHT:  # the verifier's turn: one block
                t1 = perf()
                if not in_flight:  # a plain step: one token the drafter did not propose
                    committed.append(truth[len(committed)])
                    sequence = list(committed)
                    t1 = perf()
                    drafter.accept(rid, len(committed) - 1)
                    cost += perf() - t1
                else:
                    head = in_flight.pop(0)
                    emitted, accepted = verify(truth, committed, head.tokens)
                    accepted_total += accepted
                    if accepted == len(head.tokens):
                        committed += emitted[:-1]  # the bonus is deferred: later blocks stay valid
                    else:
                        committed += emitted
                        in_flight.clear()
                        t1 = perf()
                        drafter.accept(rid, len(committed) - len(emitted) + accepted)
                        cost += perf() - t1
                        sequence = list(committed)
            costs.append(cost)
    drafter.release(rid)
    return {"prefill_s": prefill_s, "costs": costs, "proposed": proposed, "accepted": accepted_total,
            "matches": matches, "decoded": len(committed) - context}


def state_bytes(tokens: list[int]) -> int:
    """Memory the drafter holds for a request with `tokens` as its prompt (tracemalloc)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    drafter = SuffixDrafter()
    call(drafter.prefill("m", tokens))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    drafter.release("m")
    return held


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--blocks", type=int, default=400)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--k", type=int, default=32, help="the caller's budget per block")
    args = parser.parse_args()

    span = max(args.contexts) + args.blocks * (args.k + 2) + 1
    data, files = workloads(span * args.windows + span)
    table = []
    for name, tokens in data.items():
        for context in args.contexts:
            if len(tokens) < span * args.windows:
                print(f"{name}: {len(tokens)} tokens, too few for {args.windows} windows", file=sys.stderr)
                continue
            memory = state_bytes(tokens[:context])
            for mode in ("sequential", "pipelined"):
                runs = [run_window(tokens[w * span:(w + 1) * span], context, args.blocks, args.k, mode)
                        for w in range(args.windows)]
                costs = [c for r in runs for c in r["costs"]]
                proposed = sum(r["proposed"] for r in runs)
                entry = {
                    "workload": name, "context": context, "mode": mode, "k": args.k, "blocks": len(costs),
                    "block_us_median": median(costs) * 1e6, "block_us_p90": percentile(costs, 0.9) * 1e6,
                    "block_us_max": max(costs) * 1e6,
                    "prefill_ms_median": median([r["prefill_s"] for r in runs]) * 1e3,
                    "prefill_us_per_token": median([r["prefill_s"] for r in runs]) / context * 1e6,
                    "proposed_per_block": proposed / len(costs),
                    "acceptance": sum(r["accepted"] for r in runs) / proposed if proposed else 0.0,
                    "match_median": median([m for r in runs for m in r["matches"]]),
                    "decoded_tokens": sum(r["decoded"] for r in runs),
                    "state_bytes": memory, "state_bytes_per_token": memory / context,
                }
                table.append(entry)
                print(f"{name:13s} ctx {context:6d} {mode:10s} block median {entry['block_us_median']:7.1f} us "
                      f"(p90 {entry['block_us_p90']:7.1f}, max {entry['block_us_max']:8.1f})  "
                      f"prefill {entry['prefill_ms_median']:7.1f} ms  {entry['proposed_per_block']:5.1f} proposed, "
                      f"{entry['acceptance']:.0%} accepted, state {memory / 2**20:5.1f} MiB", file=sys.stderr)
    path = save("suffix_cost", {"machine": machine(), "args": vars(args), "source_files": len(files),
                                "source_first_last": [files[0], files[-1]], "table": table})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""`exo run`: one generation in this process, streamed to the terminal (or as JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from exo.inference.backends import ENGINES
from exo.inference.generate import GenerationParams
from exo.inference.placement import PLACEMENTS, make_engine_pair
from exo.inference.sources import ModelSourceError
from exo.inference.text_stream import TextStream
from exo.models import UnknownModelError
from exo.inference.batching import DEFAULT_MAX_BATCH
from exo.speculative.config import DRAFTERS, FLAGS, ConfigError, SpeculativeConfig
from exo.speculative.engine import SpeculativeInferenceEngine


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--prompt", default="Write a Python function that reverses a string.", help="user message")
    run.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    run.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    run.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling and speculation")
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token ids, finish reason, metrics) instead of streaming")
    add_engine_arguments(run)
    add_speculative_arguments(run)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference-engine", choices=ENGINES, default="mlx",
                        help="engine for the model (default mlx; tinygrad runs on its CPU or GPU backends)")
    parser.add_argument("--draft-inference-engine", choices=ENGINES, default=None,
                        help="engine for the speculative draft (default: same as --inference-engine); "
                             "mixing engines is allowed")


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `SpeculativeConfig` field (names and help from `config.FLAGS`), each
    storing the field's own value under the field's name, plus where the engines run."""
    defaults = SpeculativeConfig()
    group = parser.add_argument_group("speculative decoding")
    for name, flag in FLAGS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            group.add_argument(flag.name, dest=name, default=default, help=flag.help,
                               action="store_false" if flag.inverted else "store_true")
        else:
            group.add_argument(flag.name, dest=name, default=default, type=type(default), help=flag.help,
                               metavar=flag.metavar or flag.name[2:].upper().replace("-", "_"),
                               choices=DRAFTERS if name == "drafter" else None)
    add_node_engine_arguments(parser)


def add_node_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """What both commands share about how the engines run (see `engine_settings`)."""
    group = parser.add_argument_group("engines")
    group.add_argument("--placement", choices=PLACEMENTS, default="threads",
                       help="threads: both models in this process (default); processes: target and draft in "
                            "separate processes pinned to separate CPUs")
    group.add_argument("--max-batch-size", type=int, default=None,
                       help="requests whose steps share one forward pass per engine (continuous batching; "
                            f"1 turns it off; default {DEFAULT_MAX_BATCH} with --placement threads; engines in "
                            "their own processes run one request's pass at a time, so there only 1 is allowed)")


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    """The config the flags describe (ConfigError, a ValueError, when they break its checks)."""
    return SpeculativeConfig(**{name: getattr(args, name) for name in SpeculativeConfig.__struct_fields__})


def max_batch_size(args: argparse.Namespace) -> int:
    """The batch bound the flags ask for, refused (ValueError) where it cannot act."""
    if args.max_batch_size is None:
        return DEFAULT_MAX_BATCH if args.placement == "threads" else 1
    if args.max_batch_size < 1:
        raise ValueError("--max-batch-size must be at least 1")
    if args.max_batch_size > 1 and args.placement != "threads":
        raise ValueError(f"--max-batch-size {args.max_batch_size} cannot act with --placement {args.placement}: "
                         "engines in their own processes run one pass per request; use --placement threads "
                         "to batch, or --max-batch-size 1")
    return args.max_batch_size


def engine_pair(args: argparse.Namespace):
    """(target, draft) engines as the command line chose them."""
    return make_engine_pair(args.placement, args.inference_engine, args.draft_inference_engine)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout, by Python, C libraries or child processes, to
    stderr while models load: stdout carries only the generation or the JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


async def run_command(args: argparse.Namespace) -> int:
    try:
        params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed)
        config = speculative_config(args)
        batch = max_batch_size(args)
        # Separate processes compute on separate CPUs: there the two prompt passes overlap.
        engine = SpeculativeInferenceEngine(*engine_pair(args), config,
                                            overlap_prefill=args.placement == "processes")
        engine.set_max_batch(batch)
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"exo run: {exc}", file=sys.stderr)
        return 2
    try:
        return await _generate(args, engine, params, config)
    finally:
        engine.close()


async def _generate(args: argparse.Namespace, engine: SpeculativeInferenceEngine, params: GenerationParams,
                    config: SpeculativeConfig) -> int:
    try:
        with stdout_to_stderr():
            shard = await engine.full_shard(args.model)
            await engine.ensure_shard(shard)
    except (UnknownModelError, ModelSourceError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"exo run: {exc}", file=sys.stderr)
        return 2
    tokenizer = engine.tokenizer
    text = args.prompt if args.raw else tokenizer.chat_prompt([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text)
    text_stream = TextStream(tokenizer, [], tokenizer.eos_token_ids)
    started = time.perf_counter()
    first_at = None
    tokens: list[int] = []
    pieces: list[str] = []
    async with engine.generate(shard, prompt_ids, params) as blocks:
        async for block in blocks:
            first_at = first_at or time.perf_counter()
            tokens += block.tokens
            pieces += [text_stream.push(token) for token in block.tokens]
            if not args.json:
                sys.stdout.write("".join(pieces[-len(block.tokens):]))
                sys.stdout.flush()
    pieces.append(text_stream.flush())
    decode_s = time.perf_counter() - first_at
    rate = (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0
    request = engine.last_request
    metrics = engine.get_metrics()["last_request"]
    if args.json:
        print(json.dumps({
            "model": args.model, "text": "".join(pieces), "token_ids": tokens,
            "finish_reason": request.finish_reason,
            "prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
            "prefill_seconds": round(first_at - started, 4), "decode_tokens_per_second": round(rate, 3),
            "speculative": config.enabled, "metrics": metrics,
        }))
    else:
        sys.stdout.write(pieces[-1])
        summary = (f"{len(prompt_ids)} prompt tokens, prefill {first_at - started:.2f} s; "
                   f"{len(tokens)} tokens, {rate:.2f} tokens/s")
        if config.enabled:
            summary += (f"; acceptance {metrics['acceptance_rate']:.0%}, "
                        f"{metrics['mean_accepted_length']:.2f} tokens/verify")
        print(f"\n\n[{summary}]", file=sys.stderr)
    return 0

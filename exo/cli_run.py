"""`exo run`: one generation in this process, streamed to the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from exo.inference.detokenize import StreamingDetokenizer
from exo.inference.generate import GenerationParams, generate_plain
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.shard import Shard
from exo.inference.sources import ModelSourceError
from exo.models import UnknownModelError

log = logging.getLogger("exo.run")


async def run_command(args: argparse.Namespace) -> int:
    try:
        params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed)
    except ValueError as exc:
        print(f"exo run: {exc}", file=sys.stderr)
        return 2
    engine = MLXInferenceEngine()
    try:
        shard = await engine.full_shard(args.model)
        await engine.ensure_shard(shard)
    except (UnknownModelError, ModelSourceError, FileNotFoundError, ValueError) as exc:
        print(f"exo run: {exc}", file=sys.stderr)
        return 2
    tokenizer = engine.tokenizer
    text = args.prompt if args.raw else tokenizer.chat_prompt([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_ids
    detok = StreamingDetokenizer(tokenizer, skip_ids=eos)
    started = time.perf_counter()
    first_token_at = None
    count = 0
    async for tokens in generate_plain(engine, shard, prompt_ids, params, eos):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        count += len(tokens)
        sys.stdout.write(detok.add(tokens))
        sys.stdout.flush()
    finished = time.perf_counter()
    decode_s = finished - first_token_at
    rate = (count - 1) / decode_s if count > 1 and decode_s > 0 else float("nan")
    print(f"\n\n[{len(prompt_ids)} prompt tokens, prefill {first_token_at - started:.2f} s; "
          f"{count} tokens, {rate:.2f} tokens/s decode]", file=sys.stderr)
    engine.close()
    return 0

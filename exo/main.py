"""The `exo` command line: wiring only."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import anyio

from exo import blas
from exo.models import CARDS, DEFAULT_MODEL

log = logging.getLogger("exo")
DEFAULT_PROMPT = "Write a Python function that reverses a string."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo", description="Exo node with speculative decoding.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="generate from one prompt in this process",
                              description="Stream a generation to the terminal using the model's chat template.")
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"model card id ({', '.join(sorted(CARDS))}), a model directory or a .gguf file "
                          f"(default {DEFAULT_MODEL})")
    run.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message")
    run.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    run.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    run.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("--inference-engine", choices=["mlx"], default="mlx", help="engine (default mlx)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    blas.report_blas()
    if args.command != "run":
        build_parser().print_help()
        return 2
    from exo.cli_run import run_command

    try:
        return anyio.run(run_command, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

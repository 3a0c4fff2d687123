"""The `exo` command line: wiring only.

`exo [flags]` starts a node with the ChatGPT-compatible API; `exo run MODEL` generates
once in this process.
"""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from exo import blas
from exo.cli_run import add_engine_arguments, add_run_arguments, add_speculative_arguments
from exo.models import CARDS, DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exo", description="Exo node with lossless speculative decoding and a ChatGPT-compatible API.",
        epilog="`exo run --help` documents one-shot generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_engine_arguments(parser)
    parser.add_argument("--default-model", default=DEFAULT_MODEL,
                        help=f"model used when a request names none (default {DEFAULT_MODEL})")
    parser.add_argument("--chatgpt-api-port", type=int, default=52415, help="API port (default 52415)")
    parser.add_argument("--host", default="0.0.0.0", help="API bind address (default 0.0.0.0)")
    parser.add_argument("--node-id", default=None, help="this node's id (default: random)")
    parser.add_argument("--default-temp", type=float, default=0.0, help="temperature when a request sets none")
    parser.add_argument("--max-generate-tokens", type=int, default=1024,
                        help="token budget when a request sets none (default 1024)")
    add_speculative_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="{run}")
    run = commands.add_parser("run", help="generate from one prompt in this process",
                              description="Stream a generation to the terminal using the model's chat template.")
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"model card id ({', '.join(sorted(CARDS))}), a model directory or a .gguf file "
                          f"(default {DEFAULT_MODEL})")
    add_run_arguments(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    blas.report_blas()
    if args.command == "run":
        from exo.cli_run import run_command
        entry = run_command
    else:
        from exo.cli_node import serve_command
        entry = serve_command
    try:
        return anyio.run(entry, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

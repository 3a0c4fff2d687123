"""The `exo` command line: wiring only."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from exo import blas
from exo.cli_run import add_run_arguments
from exo.models import CARDS, DEFAULT_MODEL

log = logging.getLogger("exo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo", description="Exo node with speculative decoding.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command")
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

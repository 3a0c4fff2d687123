"""The `exo` command line: wiring only.

`exo [flags]` starts a node with the ChatGPT-compatible API; `exo run MODEL` generates
once in this process.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
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
    parser.add_argument("--api-key", default=os.environ.get("EXO_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every API route but /healthcheck "
                             "(default: $EXO_API_KEY; none: open)")
    parser.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME[,NAME...]",
                        help="Host names the API answers (repeatable or comma-separated; '*': any); others "
                             "get 421, against DNS rebinding. IP literals are always answered (default: "
                             "also localhost and this machine's name, plain and .local)")
    parser.add_argument("--allow-model-downloads", action=argparse.BooleanOptionalAction, default=None,
                        help="let a request name (as model or speculative.draft_model) a card whose weights are "
                             "not on disk yet, which makes the node fetch it (default: only when the API listens "
                             "on loopback; otherwise requests may name models on disk and the operator's own)")
    parser.add_argument("--model-dir", action="append", default=[], metavar="NAME=PATH",
                        help="serve the model directory or .gguf file PATH as model NAME (repeatable); "
                             "requests can only name cards and models registered here")
    parser.add_argument("--node-id", default=None, help="this node's id (default: random)")
    parser.add_argument("--default-temp", type=float, default=0.0, help="temperature when a request sets none")
    parser.add_argument("--max-generate-tokens", type=int, default=1024,
                        help="token budget when a request sets none (default 1024)")
    parser.add_argument("--max-concurrent-requests", type=int, default=None,
                        help="requests generating at once; more wait in a first-come queue (default: as many "
                             "as fit 4096-token KV caches in half the free memory, 1 to 64)")
    parser.add_argument("--max-queued-requests", type=int, default=64,
                        help="requests that may wait for a slot; more get 429 with Retry-After (default 64)")
    parser.add_argument("--queue-timeout", type=float, default=60.0,
                        help="seconds a request may wait for a slot before it gets 429 (default 60)")
    add_speculative_arguments(parser)
    add_cluster_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="{run}")
    run = commands.add_parser("run", help="generate from one prompt in this process",
                              description="Stream a generation to the terminal using the model's chat template.")
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"model card id ({', '.join(sorted(CARDS))}), a model directory or a .gguf file "
                          f"(default {DEFAULT_MODEL})")
    add_run_arguments(run)
    return parser


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (the target's layers split over a ring of nodes)")
    group.add_argument("--node-host", default="0.0.0.0", help="RPC bind address announced to peers (default 0.0.0.0)")
    group.add_argument("--node-port", type=int, default=50051, help="RPC port (default 50051)")
    group.add_argument("--discovery-module", choices=["udp", "manual", "none"], default="udp",
                       help="how peers are found: UDP broadcast (default), a peers file, or none (single node)")
    group.add_argument("--discovery-config-path", default=None,
                       help="peers file for --discovery-module manual (JSON or TOML: "
                            '{"peers": {"<id>": {"address": ..., "port": ..., "memory": ...}}})')
    group.add_argument("--broadcast-address", default="255.255.255.255",
                       help="UDP discovery destination (default 255.255.255.255; 127.255.255.255 for loopback)")
    group.add_argument("--listen-port", type=int, default=5678, help="UDP discovery port (default 5678)")
    group.add_argument("--node-memory", type=float, default=None,
                       help="memory in GB announced for layer partitioning (default: this machine's)")
    group.add_argument("--draft-node", default=None,
                       help="node id that runs the draft and schedules requests (default: the node holding layer 0)")
    group.add_argument("--ring-timeout", type=float, default=60.0,
                       help="seconds a block may take round the ring before the request fails (default 60)")
    group.add_argument("--link-delay-ms", type=float, default=0.0,
                       help="add this one-way delay to every message to a peer (simulated network latency)")
    group.add_argument("--link-jitter-ms", type=float, default=0.0,
                       help="add a further uniform random 0..J ms to each message's delay (messages may then "
                            "arrive out of order, as on a real network)")
    group.add_argument("--cluster-secret", default=None,
                       help="shared secret that signs every RPC call and UDP announcement of the cluster (never sent) "
                            "(default: $EXO_CLUSTER_SECRET; none: any host that reaches the RPC port can join)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if blas.build_missing_kernel() and argv is None:
        # `import exo` chose MLX's BLAS before the few-row kernel existed, and a process cannot
        # change it: run this same command line again, which finds the kernel at import.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
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


def cli() -> None:
    """The `exo` executable: `main`, then an exit that skips the interpreter's teardown.

    Native libraries (MLX's scheduler, tokenizers, OpenBLAS) own threads whose C++
    destructors race the interpreter's finalisation; under load that ended an `exo run`
    whose work was done with "terminate called without an active exception" (SIGABRT).
    Everything Python registered to run at exit still runs; only the teardown is skipped.
    """
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away (`exo run ... | head`)
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    cli()

"""`exo`: start a node serving the ChatGPT-compatible API, alone or in a ring of peers."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from pathlib import Path

import anyio
import uvicorn

from exo.api.access import parse_allowed_hosts, warn_if_exposed
from exo.api.chatgpt_api import ChatGPTAPI
from exo.cli_run import engine_pair, max_batch_size, speculative_config
from exo.inference.sources import ModelSourceError
from exo.inference.sources.local import check_model_dir
from exo.models import ModelRegistry
from exo.networking.auth import is_loopback, secret_from
from exo.networking.discovery import Discovery, DiscoveryConfigError, ManualDiscovery, UDPDiscovery
from exo.networking.grpc_transport import LinkOptions
from exo.networking.peer_info import PeerInfo, total_memory
from exo.orchestration.cluster import Cluster
from exo.orchestration.node import Node
from exo.speculative.config import ConfigError
from exo.speculative.engine import wants_draft_model

log = logging.getLogger("exo")


def discovery_for(args: argparse.Namespace, info: PeerInfo, secret: str = "") -> Discovery | None:
    if args.discovery_module == "none":
        return None
    if args.discovery_module == "manual":
        if not args.discovery_config_path:
            raise DiscoveryConfigError("--discovery-module manual needs --discovery-config-path")
        return ManualDiscovery(args.discovery_config_path, info.node_id)
    return UDPDiscovery(info, args.listen_port, broadcast_address=args.broadcast_address, secret=secret)


def registered_models(specs: list[str]) -> ModelRegistry:
    """The operator's `--model-dir NAME=PATH` entries, each checked now (a typo fails at start-up)."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--model-dir wants NAME=PATH, got {spec!r}")
        resolved = Path(path).expanduser().resolve()
        if resolved.suffix == ".gguf" and resolved.is_file():
            pass
        elif resolved.is_dir():
            try:
                check_model_dir(resolved)
            except ModelSourceError as exc:
                raise ValueError(f"--model-dir {name}: {exc}") from exc
        else:
            raise ValueError(f"--model-dir {name}: {resolved} is neither a model directory nor a .gguf file")
        named[name.strip()] = str(resolved)
    return ModelRegistry(named)


def downloads_allowed(args: argparse.Namespace) -> bool:
    """Client-triggered model downloads: as the operator says, else only with the API on loopback."""
    return is_loopback(args.host) if args.allow_model_downloads is None else args.allow_model_downloads


async def serve_command(args: argparse.Namespace) -> int:
    node_id = args.node_id or f"node-{uuid.uuid4().hex[:8]}"
    memory = int(args.node_memory * 1e9) if args.node_memory is not None else total_memory()
    info = PeerInfo(node_id, args.node_host, args.node_port, memory)
    try:
        link = LinkOptions(args.link_delay_ms / 1000, args.link_jitter_ms / 1000, secret_from(args.cluster_secret))
        config = speculative_config(args)
        discovery = discovery_for(args, info, link.secret)
        models = registered_models(args.model_dir)
        if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
            raise ValueError("--max-concurrent-requests must be at least 1")
        batch = max_batch_size(args)
        if args.max_queued_requests < 0 or args.queue_timeout <= 0:
            raise ValueError("--max-queued-requests must be at least 0 and --queue-timeout positive")
    except (ConfigError, ValueError) as exc:
        print(f"exo: {exc}", file=sys.stderr)
        return 2

    def cluster(engine, events) -> Cluster:
        return Cluster(info, engine, events, discovery, link=link)

    node = Node(node_id, lambda: engine_pair(args), config, args.default_model,
                max_generate_tokens=args.max_generate_tokens, default_temperature=args.default_temp,
                cluster=cluster, pass_timeout_s=args.ring_timeout, draft_node=args.draft_node, models=models,
                max_concurrent_requests=args.max_concurrent_requests, max_queued_requests=args.max_queued_requests,
                queue_timeout_s=args.queue_timeout, max_batch_size=batch,
                allow_model_downloads=downloads_allowed(args))
    try:
        async with anyio.create_task_group() as group:
            await group.start(node.cluster.run)
            if discovery is None:  # alone for good: load now, so the first request is quick
                log.info("loading %s%s", args.default_model, " with speculative decoding" if config.enabled else "")
                await node.shard_for(args.default_model)
                if config.enabled and wants_draft_model(config, args.default_model):
                    await node.engine.ensure_draft(args.default_model, config.draft_model)
            api = ChatGPTAPI(node, api_key=args.api_key, allowed_hosts=parse_allowed_hosts(args.allowed_hosts))
            warn_if_exposed(args.host, args.api_key)
            server = uvicorn.Server(uvicorn.Config(api.app, host=args.host, port=args.chatgpt_api_port,
                                                   log_level="warning", lifespan="off"))
            log.info("node %s: ChatGPT-compatible API on http://%s:%d/v1 (engine %s, draft engine %s, "
                     "speculative %s%s)", node.id, args.host, args.chatgpt_api_port, args.inference_engine,
                     args.draft_inference_engine or args.inference_engine, "on" if config.enabled else "off",
                     ", pipelined" if config.pipelined else "")
            await server.serve()
            group.cancel_scope.cancel()
        return 0
    finally:
        node.close()

"""`exo`: start a node serving the ChatGPT-compatible API, alone or in a ring of peers."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

import anyio
import uvicorn

from exo.api.chatgpt_api import ChatGPTAPI
from exo.cli_run import engine_pair, speculative_config
from exo.networking.auth import secret_from
from exo.networking.discovery import Discovery, DiscoveryConfigError, ManualDiscovery, UDPDiscovery
from exo.networking.grpc_transport import LinkOptions
from exo.networking.peer_info import PeerInfo, total_memory
from exo.orchestration.cluster import Cluster
from exo.orchestration.node import Node
from exo.speculative.config import ConfigError

log = logging.getLogger("exo")


def discovery_for(args: argparse.Namespace, info: PeerInfo, secret: str = "") -> Discovery | None:
    if args.discovery_module == "none":
        return None
    if args.discovery_module == "manual":
        if not args.discovery_config_path:
            raise DiscoveryConfigError("--discovery-module manual needs --discovery-config-path")
        return ManualDiscovery(args.discovery_config_path, info.node_id)
    return UDPDiscovery(info, args.listen_port, broadcast_address=args.broadcast_address, secret=secret)


async def serve_command(args: argparse.Namespace) -> int:
    node_id = args.node_id or f"node-{uuid.uuid4().hex[:8]}"
    memory = int(args.node_memory * 1e9) if args.node_memory is not None else total_memory()
    info = PeerInfo(node_id, args.node_host, args.node_port, memory)
    try:
        link = LinkOptions(args.link_delay_ms / 1000, args.link_jitter_ms / 1000, secret_from(args.cluster_secret))
        config = speculative_config(args)
        discovery = discovery_for(args, info, link.secret)
    except (ConfigError, ValueError) as exc:
        print(f"exo: {exc}", file=sys.stderr)
        return 2

    def cluster(engine, events) -> Cluster:
        return Cluster(info, engine, events, discovery, link=link)

    node = Node(node_id, lambda: engine_pair(args), config, args.default_model,
                max_generate_tokens=args.max_generate_tokens, default_temperature=args.default_temp,
                cluster=cluster, pass_timeout_s=args.ring_timeout, draft_node=args.draft_node)
    try:
        async with anyio.create_task_group() as group:
            await group.start(node.cluster.run)
            if discovery is None:  # alone for good: load now, so the first request is quick
                log.info("loading %s%s", args.default_model, " with speculative decoding" if config.enabled else "")
                await node.shard_for(args.default_model)
                if config.enabled:
                    await node.engine.ensure_draft(args.default_model, config.draft_model)
            api = ChatGPTAPI(node)
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

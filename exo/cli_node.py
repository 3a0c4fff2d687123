"""`exo`: start a node serving the ChatGPT-compatible API."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

import uvicorn

from exo.api.chatgpt_api import ChatGPTAPI
from exo.cli_run import engine_pair, speculative_config
from exo.orchestration.node import Node
from exo.speculative.config import ConfigError

log = logging.getLogger("exo")


async def serve_command(args: argparse.Namespace) -> int:
    try:
        config = speculative_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"exo: {exc}", file=sys.stderr)
        return 2
    node = Node(args.node_id or f"node-{uuid.uuid4().hex[:8]}", lambda: engine_pair(args), config,
                args.default_model, max_generate_tokens=args.max_generate_tokens,
                default_temperature=args.default_temp)
    try:
        log.info("loading %s%s", args.default_model, " with speculative decoding" if config.enabled else "")
        await node.shard_for(args.default_model)
        if config.enabled:
            await node.engine.ensure_draft(args.default_model, config.draft_model)
        api = ChatGPTAPI(node)
        server = uvicorn.Server(uvicorn.Config(api.app, host=args.host, port=args.chatgpt_api_port,
                                               log_level="warning", lifespan="off"))
        log.info("node %s: ChatGPT-compatible API on http://%s:%d/v1 (engine %s, draft engine %s, speculative %s%s)",
                 node.id, args.host, args.chatgpt_api_port, args.inference_engine,
                 args.draft_inference_engine or args.inference_engine, "on" if config.enabled else "off",
                 ", pipelined" if config.pipelined else "")
        await server.serve()
        return 0
    finally:
        node.close()

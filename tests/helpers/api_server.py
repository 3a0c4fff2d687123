"""A real node + API served by uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from exo.api.chatgpt_api import ChatGPTAPI
from tools.local_ring import free_port
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.orchestration.node import Node
from exo.speculative.config import SpeculativeConfig


@contextmanager
def running_api(default_model: str, config: SpeculativeConfig, api_options: dict | None = None,
                **node_options) -> Iterator[tuple[str, Node]]:
    node = Node("test-node", lambda: (MLXInferenceEngine(), MLXInferenceEngine()), config, default_model,
                **node_options)
    port = free_port()
    api = ChatGPTAPI(node, disconnect_poll_s=0.05, **(api_options or {}))
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", node
    finally:
        server.should_exit = True
        thread.join(30)
        node.close()

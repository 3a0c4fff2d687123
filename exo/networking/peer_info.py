"""What a node announces about itself: enough to reach it and to give it its share of layers."""

from __future__ import annotations

import os

import msgspec


class PeerInfo(msgspec.Struct, frozen=True):
    node_id: str
    host: str  # address its RPC server listens on
    port: int
    memory: int = 0  # bytes; layer ranges are proportional to it


def total_memory() -> int:
    """Physical memory of this machine in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0

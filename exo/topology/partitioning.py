"""Split a model's layers over the ring in proportion to each node's memory.

Every node runs this on the same peer list and must arrive at the same ring, so the order is
fully determined by the inputs: largest memory first, ties broken by node_id. The largest node
takes layer 0 (it also holds the embeddings and usually the draft model).

Boundaries are placed by cumulative-fraction rounding: the end of node i's range is
round(n_layers * (memory of nodes 0..i) / total memory). Rounding the running total, rather than
each share on its own, keeps the sum exact (the last boundary is always n_layers) and keeps every
share within one layer of its ideal. Nodes whose share rounds to zero are then given one layer,
taken from their neighbours, because a node in the ring with no layers would only add a hop.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import msgspec


class NodeMemory(Protocol):
    """What partitioning needs to know of a node (the transport's `PeerInfo` is one)."""

    @property
    def node_id(self) -> str: ...

    @property
    def memory(self) -> int: ...  # bytes; 0 when the node does not report it


N = TypeVar("N", bound=NodeMemory)


class Stage(msgspec.Struct, frozen=True):
    node_id: str
    start_layer: int  # inclusive
    end_layer: int  # inclusive


def ring_order(nodes: Sequence[N]) -> list[N]:
    """The ring every node agrees on: largest memory first, ties by node_id."""
    return sorted(nodes, key=lambda p: (-p.memory, p.node_id))


def partition_by_memory(nodes: Sequence[NodeMemory], n_layers: int) -> list[Stage]:
    """Contiguous layer ranges in ring order, covering 0..n_layers-1 exactly, at least one each.

    Raises ValueError when no split is possible (no nodes, n_layers < 1, more nodes than
    layers) or the input is inconsistent (duplicate node ids, negative memory).
    """
    if n_layers < 1:
        raise ValueError(f"cannot partition a model with n_layers={n_layers}: need at least 1 layer")
    if not nodes:
        raise ValueError("cannot partition layers over an empty node list")
    if len(nodes) > n_layers:
        raise ValueError(
            f"{len(nodes)} nodes but only {n_layers} layers: every node needs at least one layer"
        )
    ids = [p.node_id for p in nodes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate node ids in partition input: {duplicates}")
    negative = [p.node_id for p in nodes if p.memory < 0]
    if negative:
        raise ValueError(f"negative memory reported by nodes: {negative}")

    ring = ring_order(nodes)
    # All-zero memory (nodes that do not report it) means an equal split.
    weights = [p.memory for p in ring] if any(p.memory > 0 for p in ring) else [1] * len(ring)
    total = sum(weights)
    k = len(ring)

    # bounds[i] = first layer of node i; bounds[k] = n_layers. Integer round-half-up of
    # n_layers * cumulative / total, so no float error can move a boundary.
    bounds = [0] * (k + 1)
    cumulative = 0
    for i, w in enumerate(weights):
        cumulative += w
        bounds[i + 1] = (2 * n_layers * cumulative + total) // (2 * total)
    bounds[k] = n_layers  # already true by construction; stated for the reader

    # Give every node at least one layer: push boundaries up past empty ranges, then pull them
    # back down from the end so the last nodes still fit. Afterwards bounds is strictly
    # increasing with bounds[0] == 0 and bounds[k] == n_layers (possible since k <= n_layers).
    for i in range(1, k):
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    for i in range(k - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)

    return [
        Stage(node_id=p.node_id, start_layer=bounds[i], end_layer=bounds[i + 1] - 1)
        for i, p in enumerate(ring)
    ]

"""The interface every discovery mechanism offers the node: a long-running task and a peer view.

The node starts `run()` in its task group and reads `peers()` whenever it rebuilds the ring, so
discovery never calls back into the node and can be swapped (manual file, UDP broadcast, ...)
without the node knowing which one it has.
"""

from __future__ import annotations

import abc

import anyio
from anyio.abc import TaskStatus

from exo.networking.peer_info import PeerInfo


class DiscoveryConfigError(ValueError):
    """Discovery cannot start because its configuration (e.g. a peers file) is unusable."""


class Discovery(abc.ABC):
    """Keeps a view of the other nodes of the cluster fresh while `run()` is running."""

    @abc.abstractmethod
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Signals `task_status.started()` once it is listening/ready,
        so `await task_group.start(d.run)` returns only when the view can start filling."""

    @abc.abstractmethod
    def peers(self) -> dict[str, PeerInfo]:
        """A snapshot of the currently known peers by node_id, never including this node."""

"""Discovery from a peers file that the operator writes (JSON or TOML, chosen by extension).

Format, compatible with upstream Exo's manual-discovery file where it can be::

    {"peers": {"<node_id>": {"address": "192.168.1.10", "port": 5678, "memory": 17179869184}}}

`memory` (bytes) is optional. Upstream's `device_capabilities.memory` (MiB) is read when `memory`
is absent; other unknown keys are ignored. The same file can be copied to every node: the entry
for this node is skipped. The file is re-read when it changes, so nodes can be added without a
restart; a broken edit is logged and the last good view kept, since a typo in a config file
should not take a running node down. A broken file at startup is an error, because then there is
no good view to keep.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from exo.networking.discovery.base import Discovery, DiscoveryConfigError
from exo.networking.peer_info import PeerInfo

log = logging.getLogger("exo.discovery.manual")

_MIB = 1024 * 1024


class _DeviceCapabilities(msgspec.Struct):
    memory: Annotated[int, msgspec.Meta(ge=0)] = 0  # MiB, as upstream Exo writes it


class _PeerEntry(msgspec.Struct):
    address: Annotated[str, msgspec.Meta(min_length=1)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    memory: Annotated[int, msgspec.Meta(ge=0)] | None = None  # bytes
    device_capabilities: _DeviceCapabilities | None = None


class _PeersFile(msgspec.Struct):
    # Entries are validated one by one below, so an error can name the node it is about
    # (msgspec reports dict keys as `[...]`).
    peers: dict[Annotated[str, msgspec.Meta(min_length=1)], dict[str, Any]]


def load_peers_file(path: Path) -> dict[str, PeerInfo]:
    """Parse and validate a peers file; every problem becomes a DiscoveryConfigError naming it."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise DiscoveryConfigError(f"peers file {path}: unsupported extension {suffix!r} (use .json or .toml)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DiscoveryConfigError(f"peers file {path} does not exist") from None
    except OSError as e:
        raise DiscoveryConfigError(f"peers file {path} cannot be read: {e}") from e
    try:
        data = msgspec.json.decode(raw) if suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (msgspec.DecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DiscoveryConfigError(f"peers file {path} is not valid {suffix[1:].upper()}: {e}") from e
    try:
        parsed = msgspec.convert(data, type=_PeersFile)
    except msgspec.ValidationError as e:
        raise DiscoveryConfigError(f"peers file {path} has the wrong shape: {e}") from e

    peers = {}
    for node_id, fields in parsed.peers.items():
        try:
            entry = msgspec.convert(fields, type=_PeerEntry)
        except msgspec.ValidationError as e:
            raise DiscoveryConfigError(f"peers file {path}, peer {node_id!r}: {e}") from e
        if entry.memory is not None:
            memory = entry.memory
        elif entry.device_capabilities is not None:
            memory = entry.device_capabilities.memory * _MIB
        else:
            memory = 0
        peers[node_id] = PeerInfo(node_id=node_id, host=entry.address, port=entry.port, memory=memory)
    return peers


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What identifies a version of the file: mtime, plus size and inode for edits within one
    mtime tick and for editors that replace the file. None while the file is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ManualDiscovery(Discovery):
    """Peers listed in a file, re-read whenever the file changes."""

    def __init__(self, path: str | Path, self_id: str, poll_s: float = 1.0) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.path = Path(path)
        self.self_id = self_id
        self.poll_s = poll_s
        # Signature first: an edit landing between stat and read is then seen as a change later.
        self._signature = _signature(self.path)
        self._all = load_peers_file(self.path)

    def peers(self) -> dict[str, PeerInfo]:
        return {k: v for k, v in self._all.items() if k != self.self_id}

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last look; True if the view was replaced."""
        sig = _signature(self.path)
        if sig == self._signature:
            return False
        self._signature = sig  # remember even a bad version, so it is warned about once
        if sig is None:
            log.warning("peers file %s disappeared; keeping the previous %d peers", self.path, len(self._all))
            return False
        try:
            new = load_peers_file(self.path)
        except DiscoveryConfigError as e:
            log.warning("%s; keeping the previous %d peers", e, len(self._all))
            return False
        if new != self._all:
            log.info("peers file %s changed: %s", self.path, sorted(k for k in new if k != self.self_id))
        self._all = new
        return True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.poll_s)
            self.refresh()

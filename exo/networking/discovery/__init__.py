"""Peer discovery: find the other nodes of the cluster (from a file, or by UDP broadcast)."""

from exo.networking.discovery.base import Discovery, DiscoveryConfigError
from exo.networking.discovery.manual import ManualDiscovery
from exo.networking.discovery.udp import UDPDiscovery

__all__ = ["Discovery", "DiscoveryConfigError", "ManualDiscovery", "UDPDiscovery"]

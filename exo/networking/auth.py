"""The cluster secret: who may talk to a node's RPC port and announce itself on the LAN.

Every gRPC call carries the secret in its metadata and the server compares it in constant
time; UDP announcements carry an HMAC of their payload under it. The secret proves
membership, nothing more: calls are not encrypted, so on a network you do not trust run the
cluster inside a VPN (WireGuard, Tailscale) as well.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from typing import Iterable

METADATA_KEY = "x-exo-cluster-secret"  # gRPC metadata keys are lower case
ENV_VAR = "EXO_CLUSTER_SECRET"


def secret_from(flag: str | None) -> str:
    """The secret from the flag, else from the environment (which keeps it out of `ps`)."""
    return flag if flag is not None else os.environ.get(ENV_VAR, "")


def call_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Metadata that every call to a peer carries (none without a secret)."""
    return ((METADATA_KEY, secret),) if secret else ()


def authorized(secret: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's metadata carries `secret` (always, when this node has none)."""
    if not secret:
        return True
    presented = next((value for key, value in metadata or () if key == METADATA_KEY), None)
    if presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode()
    return hmac.compare_digest(presented, secret.encode())


def sign(secret: str, payload: bytes) -> bytes:
    """HMAC-SHA256 of `payload` under the secret (empty without one)."""
    return hmac.digest(secret.encode(), payload, hashlib.sha256) if secret else b""


def signed_by(secret: str, payload: bytes, mac: bytes) -> bool:
    """Whether `mac` is the secret's HMAC of `payload` (always, when this node has no secret)."""
    return not secret or hmac.compare_digest(mac, sign(secret, payload))


def is_loopback(host: str) -> bool:
    """Whether a bind address keeps a server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond loopback

"""Desired WireGuard state: one peer per remote node, one route per remote pod CIDR."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

from plexus.core.tables import Table


@dataclass(frozen=True)
class Peer:
    node: tuple[str, str]  # (cluster, name)
    public_key: bytes
    endpoint: str
    port: int
    allowed_ips: tuple[str, ...]

    @property
    def key(self) -> str:
        return base64.b64encode(self.public_key).decode()


@dataclass(frozen=True)
class EncryptedRoute:
    """A remote pod CIDR, a service frontend, or a node's address for its tunnels: through the
    device, or dropped (strict mode, no peer)."""

    dst: str
    kind: Literal["device", "blackhole"]
    node: tuple[str, str]  # the node (cluster, name); for a frontend, the service (namespace, name)
    src: str | None = None  # the source address packets take (a node's own, for its tunnels)

    @property
    def key(self) -> str:
        return self.dst


def peers_table() -> Table[str, Peer]:
    return Table("wireguard-peers", key=lambda p: p.key)


def routes_table() -> Table[str, EncryptedRoute]:
    return Table("wireguard-routes", key=lambda r: r.key)


def tunnel_routes_table() -> Table[str, EncryptedRoute]:
    return Table("wireguard-tunnel-routes", key=lambda r: r.key)

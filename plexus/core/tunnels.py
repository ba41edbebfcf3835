"""Tunnels a feature runs between nodes over the underlay (UDP from node address to node
address), which encryption, when on, carries inside WireGuard.

A feature (the egress gateway, for its VXLAN device) writes a row naming the UDP port its
tunnel's packets go to; the encryption module sends packets to that port of another node
through its device. Neither feature imports the other: this table is all they share. The
node module lowers the pods' MTU by the largest overhead listed, so a pod's packet fits the
tunnel (and WireGuard around it) without being fragmented.
"""

from __future__ import annotations

from dataclasses import dataclass

from plexus.core.module import Hive, Key
from plexus.core.tables import Table


@dataclass(frozen=True)
class NodeTunnel:
    port: int   # the UDP destination port of the tunnel's packets
    owner: str  # the module that runs the tunnel
    what: str   # for status pages ("VXLAN to egress gateways")
    overhead: int = 0  # bytes its encapsulation adds to a pod's packet (pods' MTU leaves room)

    @property
    def key(self) -> int:
        return self.port


NODE_TUNNELS: Key[Table[int, NodeTunnel]] = Key("node-tunnels")


def node_tunnels(hive: Hive) -> Table[int, NodeTunnel]:
    """The hive's table; the first module that asks for it creates it (build order free)."""
    table = hive.optional(NODE_TUNNELS)  # an empty table is falsy: compare with None
    if table is None:
        table = hive.provide(NODE_TUNNELS, Table("node-tunnels", key=lambda t: t.key))
    return table

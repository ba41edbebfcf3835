"""What the ipcache maps hold, derived from the merged tables, pure.

One row per prefix, IPv4 and IPv6 alike (the loader puts each in its family's LPM trie).
Where sources name the same prefix, the most specific owner wins: an endpoint's ipcache
entry, then a CIDR a policy names, then a node address (this node: host, any other:
remote-node), then this node's configured IP. `IpcacheRows` keeps the node and CIDR rows so a
change to one source re-derives only the prefixes it touches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from clustermesh.models import ID_HOST, ID_REMOTE_NODE, IPIdentity, Node
from plexus.core.node import LocalNode

FLAG_REMOTE_CLUSTER = 1


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: str
    identity: int
    host_ip: str
    flags: int

    @property
    def key(self) -> str:
        return self.prefix


def prefix_order(prefix: str) -> tuple[int, int, int]:
    """IPv4 before IPv6, then by address and length: how listings show prefixes."""
    net = ipaddress.ip_network(prefix, strict=False)
    return (net.version, int(net.network_address), net.prefixlen)


def host_prefix(ip: str) -> str:
    """A single address as a prefix: /32 or /128."""
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


class IpcacheRows:
    def __init__(self, local: LocalNode) -> None:
        self.local = local
        self.local_row = IpcacheEntry(host_prefix(local.ip), ID_HOST, local.ip, 0)
        self.node_rows: dict[str, dict[tuple[str, str], IpcacheEntry]] = {}  # prefix -> owners
        self.node_prefixes: dict[tuple[str, str], set[str]] = {}
        self.cidr_rows: dict[str, IpcacheEntry] = {}

    def set_node(self, key: tuple[str, str], node: Node | None) -> set[str]:
        """Record a node (None: gone); returns the prefixes whose row may have changed."""
        touched = set(self.node_prefixes.pop(key, set()))
        for prefix in touched:
            owners = self.node_rows.get(prefix, {})
            owners.pop(key, None)
            if not owners:
                self.node_rows.pop(prefix, None)
        if node is not None:
            me = node.cluster == self.local.cluster and node.name == self.local.name
            mine = set()
            for a in node.addresses:
                prefix = host_prefix(a.ip)
                self.node_rows.setdefault(prefix, {})[key] = IpcacheEntry(
                    prefix, ID_HOST if me else ID_REMOTE_NODE, a.ip, 0)
                mine.add(prefix)
            if mine:
                self.node_prefixes[key] = mine
            touched |= mine
        return touched

    def set_cidrs(self, cidr_ids: dict[str, int]) -> set[str]:
        """The CIDRs policies name and their identities; returns the prefixes that changed."""
        fresh = {c: IpcacheEntry(c, ident, "", 0) for c, ident in cidr_ids.items()}
        touched = {c for c in fresh.keys() | self.cidr_rows.keys()
                   if fresh.get(c) != self.cidr_rows.get(c)}
        self.cidr_rows = fresh
        return touched

    def row(self, prefix: str, endpoint: IPIdentity | None) -> IpcacheEntry | None:
        """The row for `prefix`, given the merged ipcache table's entry for it (if any)."""
        if endpoint is not None:
            flags = FLAG_REMOTE_CLUSTER if endpoint.cluster != self.local.cluster else 0
            return IpcacheEntry(prefix, endpoint.identity, endpoint.host_ip, flags)
        if prefix in self.cidr_rows:
            return self.cidr_rows[prefix]
        owners = self.node_rows.get(prefix)
        if owners:
            # one address claimed by two nodes: this node's claim first, then the lowest key
            local = (self.local.cluster, self.local.name)
            return owners[local] if local in owners else owners[min(owners)]
        if prefix == self.local_row.prefix:
            return self.local_row
        return None

    @classmethod
    def build(cls, local: LocalNode, nodes: Iterable[Node], cidr_ids: dict[str, int]) -> IpcacheRows:
        view = cls(local)
        for n in nodes:
            view.set_node(n.key, n)
        view.set_cidrs(cidr_ids)
        return view

    def all(self, endpoints: Iterable[IPIdentity]) -> dict[str, IpcacheEntry]:
        """Every row, given every entry of the merged ipcache table."""
        by_prefix = {e.prefix: e for e in endpoints}
        out = {}
        for prefix in {self.local_row.prefix, *self.node_rows, *self.cidr_rows, *by_prefix}:
            row = self.row(prefix, by_prefix.get(prefix))
            if row is not None:
                out[prefix] = row
        return out


def ipcache_rows(local: LocalNode, nodes: Iterable[Node], cidr_ids: dict[str, int],
                 endpoints: Iterable[IPIdentity]) -> dict[str, IpcacheEntry]:
    """Every row, from scratch: the merged ipcache table (both families), node addresses,
    this node, and the CIDRs policies name."""
    return IpcacheRows.build(local, nodes, cidr_ids).all(endpoints)

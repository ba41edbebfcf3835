"""Who may say what an address is: the ipcache merged from every cluster's claims.

Every cluster's etcd claims prefixes (`cilium/state/ip/v1/`); each claim is kept in the
claims table under (cluster, prefix) and the merged ipcache table holds one winner per
prefix, a pure function of the claims and the node records:

- The local cluster's claim wins over any remote claim for the same prefix (Cilium ranks
  the local kvstore above clustermesh state: `pkg/source/source.go`). When it goes, a
  valid remote claim takes its place: the result never depends on the order of events.
- A remote's claim must lie inside one of that remote's own nodes' pod CIDRs (primary and
  secondary) or be one of its node addresses; a claim that arrives before the node record
  that allows it is held and accepted when the node arrives, and an accepted one goes when
  the node (or its CIDR) does. What the local cluster's nodes own, no remote does, whatever
  its node records say.
- Reserved identities (< 256) from a remote only where they describe the remote's own
  nodes and endpoints: host (read as remote-node, as Cilium's ipcache watcher does),
  remote-node, health and ingress.
- Two remotes claiming one prefix: the lowest cluster name wins, the other is refused
  with the winner named.

A refused claim is never applied; it is counted per cluster with its reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from clustermesh.models import (
    ID_HEALTH,
    ID_HOST,
    ID_INGRESS,
    ID_REMOTE_NODE,
    RESERVED_IDENTITIES,
    IPIdentity,
    Node,
)
from plexus.core.tables import Table

log = logging.getLogger(__name__)

ClaimKey = tuple[str, str]  # (cluster, prefix)
MIN_ALLOCATED_IDENTITY = 256
# Reserved identities a remote may give its own addresses: its nodes, its health and
# ingress endpoints. The rest (unknown, world, unmanaged, init, kube-apiserver, and any
# other below 256) describe this cluster's view of the world, never a peer's.
REMOTE_RESERVED = frozenset({ID_HOST, ID_REMOTE_NODE, ID_HEALTH, ID_INGRESS})
NODE_ONLY_RESERVED = frozenset({ID_HOST, ID_REMOTE_NODE})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def claims_table() -> Table[ClaimKey, IPIdentity]:
    return Table("ipcache-claims", key=lambda e: (e.cluster, e.prefix),
                 indexes={"cluster": lambda e: e.cluster, "prefix": lambda e: e.prefix})


@dataclass(frozen=True)
class Owned:
    """What one cluster's node records say it owns: pod CIDRs and node addresses."""

    cidrs: frozenset[Network] = frozenset()
    node_ips: frozenset[str] = frozenset()  # host prefixes: "172.31.2.11/32"
    lengths: frozenset[tuple[int, int]] = frozenset()  # (version, prefix length) of cidrs
    # (version, network as an integer, length) of each CIDR: a look-up without building networks
    _keys: frozenset[tuple[int, int, int]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keys", frozenset(
            (c.version, int(c.network_address), c.prefixlen) for c in self.cidrs))

    @classmethod
    def of(cls, nodes: Iterable[Node]) -> Owned:
        cidrs: set[Network] = set()
        ips: set[str] = set()
        for n in nodes:
            for c in (n.ipv4_alloc_cidr, n.ipv6_alloc_cidr, *n.secondary_alloc_cidrs):
                if c:
                    cidrs.add(ipaddress.ip_network(c, strict=False))
            for a in n.addresses:
                addr = ipaddress.ip_address(a.ip)
                ips.add(f"{addr}/{addr.max_prefixlen}")
        return cls(frozenset(cidrs), frozenset(ips), frozenset((c.version, c.prefixlen) for c in cidrs))

    def covers(self, prefix: str) -> bool:
        """Whether a pod CIDR holds `prefix`: one look-up per CIDR length, not per CIDR."""
        if not self.lengths:
            return False
        version, address, bits, prefixlen = _parse_prefix(prefix)
        return any(v == version and length <= prefixlen
                   and (version, address >> (bits - length) << (bits - length), length) in self._keys
                   for v, length in self.lengths)

    def holds(self, prefix: str) -> bool:
        return prefix in self.node_ips or self.covers(prefix)


def _parse_prefix(prefix: str) -> tuple[int, int, int, int]:
    """(version, address as an integer, address bits, length) of `prefix`: an IPv4 prefix
    in C (one per ipcache entry), any other through ipaddress."""
    address, _, length = prefix.partition("/")
    if ":" not in address and length.isdigit() and int(length) <= 32:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), 32, int(length)
        except (OSError, ValueError):
            pass
    net = ipaddress.ip_network(prefix, strict=False)
    return net.version, int(net.network_address), net.max_prefixlen, net.prefixlen


def refusal(entry: IPIdentity, owned: Owned, local: Owned | None = None,
            local_cluster: str = "") -> str | None:
    """Why a remote cluster's claim may not be applied, or None when it may.

    `local`: what the local cluster's nodes own; a remote whose node records overlap it
    still holds none of it."""
    prefix, who = entry.prefix, entry.cluster
    ident = entry.identity
    if ident < MIN_ALLOCATED_IDENTITY and ident not in REMOTE_RESERVED:
        name = RESERVED_IDENTITIES.get(ident, "reserved")
        return f"{prefix}: identity {ident} ({name}) is not for a remote cluster's address"
    is_node_ip = prefix in owned.node_ips
    if ident in NODE_ONLY_RESERVED and not is_node_ip:
        return f"{prefix}: identity {ident} is only for a node address of {who}"
    if not is_node_ip and not owned.covers(prefix):
        return f"{prefix} is not in a pod CIDR or a node address of {who}"
    if local is not None and local.holds(prefix):
        return f"{prefix} is in a pod CIDR or a node address of the local cluster {local_cluster}"
    return None


def applied(entry: IPIdentity, local_cluster: str) -> IPIdentity:
    """The row as applied: a peer's "host" is a remote node here."""
    if entry.cluster != local_cluster and entry.identity == ID_HOST:
        return dataclasses.replace(entry, identity=ID_REMOTE_NODE)
    return entry


def resolve(claims: dict[str, IPIdentity], owned: dict[str, Owned],
            local_cluster: str) -> tuple[IPIdentity | None, dict[str, str]]:
    """One prefix: the winning claim (as applied) and why each other claim was refused."""
    refused: dict[str, str] = {}
    valid = []
    for cluster in sorted(claims):
        entry = claims[cluster]
        why = None if cluster == local_cluster else refusal(
            entry, owned.get(cluster, Owned()), owned.get(local_cluster), local_cluster)
        if why is None:
            valid.append(cluster)
        else:
            refused[cluster] = why
    if not valid:
        return None, refused
    winner = local_cluster if local_cluster in valid else valid[0]
    held_by = "the local cluster" if winner == local_cluster else "cluster"
    for cluster in valid:
        if cluster != winner:
            refused[cluster] = f"{claims[cluster].prefix} is held by {held_by} {winner}"
    return applied(claims[winner], local_cluster), refused


@dataclass
class Refusals:
    """One cluster's claims that are not applied, and the last reason given."""

    reasons: dict[str, str] = field(default_factory=dict)  # prefix -> why
    last: str = ""

    def as_dict(self, shown: int = 20) -> dict[str, Any]:
        return {"refusedEntries": len(self.reasons), "lastRefused": self.last,
                "refused": dict(sorted(self.reasons.items())[:shown])}


class IpcacheMerge:
    """Keeps the merged ipcache table equal to `resolve` over the claims, incrementally."""

    def __init__(self, local_cluster: str, claims: Table[ClaimKey, IPIdentity],
                 nodes: Table[Any, Node], merged: Table[str, IPIdentity],
                 settled: Callable[[str], bool] = lambda _cluster: True) -> None:
        self.local_cluster = local_cluster
        self.settled = settled
        self.claims = claims
        self.nodes = nodes
        self.merged = merged
        self.owned: dict[str, Owned] = {}
        self.clusters: set[str] = set()  # every cluster that has claimed anything
        self.refusals: dict[str, Refusals] = {}
        self.refused_at: dict[str, set[str]] = {}  # prefix -> clusters with a refusal for it

    def refusals_of(self, cluster: str) -> Refusals:
        return self.refusals.get(cluster) or Refusals()

    def claims_changed(self, keys: Iterable[ClaimKey]) -> None:
        prefixes = set()
        clusters = set()
        for cluster, prefix in keys:
            clusters.add(cluster)
            prefixes.add(prefix)
        self.clusters |= clusters
        # The nodes and the claims are two change feeds: a cluster whose claims come before
        # its node records were taken in has them taken in now, and all its claims judged
        # again, as the nodes feed would (which then finds nothing changed).
        unowned = [c for c in clusters if not self._owns_anything(c)]
        if unowned:
            prefixes |= self.owners_changed((c, "") for c in unowned)
        self.refresh(prefixes)

    def _owns_anything(self, cluster: str) -> bool:
        owned = self.owned.get(cluster)
        return owned is not None and bool(owned.cidrs or owned.node_ips)

    def nodes_changed(self, keys: Iterable[tuple[str, str]]) -> None:
        """Re-evaluate every claim of the clusters whose nodes changed (theirs only)."""
        self.refresh(self.owners_changed(keys))

    def owners_changed(self, keys: Iterable[tuple[str, str]]) -> set[str]:
        """Take in the clusters' new node records; returns the prefixes to refresh."""
        changed = set()
        for c in {cluster for cluster, _ in keys}:
            fresh = Owned.of(self.nodes.by("cluster", c))
            if self.owned.get(c, Owned()) != fresh:  # a new key or label changes nothing here
                self.owned[c] = fresh
                changed.add(c)
        if self.local_cluster in changed:  # what the local cluster owns, no remote does
            changed |= {str(c) for c in self.claims.index_values("cluster")}
        prefixes: set[str] = set()
        for cluster in changed:
            found = self.claims.by("cluster", cluster)
            if found:
                self.clusters.add(cluster)
            prefixes.update(e.prefix for e in found)
        return prefixes

    def rebuild(self) -> None:
        """Everything from scratch (the initial sync opens the table to pruning after it)."""
        prefixes = self.start_rebuild()
        self.refresh(prefixes)
        self.finish_rebuild(prefixes)

    def start_rebuild(self) -> set[str]:
        """A rebuild in steps, so a caller can refresh the prefixes in slices: the node
        records taken in afresh; returns every claimed prefix."""
        by_cluster: dict[str, list[Node]] = {}
        for n in self.nodes.all():
            by_cluster.setdefault(n.cluster, []).append(n)
        self.owned = {c: Owned.of(nodes) for c, nodes in by_cluster.items()}
        keys = [k for k, _ in self.claims.items()]
        self.clusters = {cluster for cluster, _ in keys}
        prefixes = {prefix for _, prefix in keys}
        for r in self.refusals.values():
            r.reasons = {p: why for p, why in r.reasons.items() if p in prefixes}
        self.refused_at = {p: cs for p, cs in self.refused_at.items() if p in prefixes}
        return prefixes

    def finish_rebuild(self, prefixes: set[str]) -> None:
        for prefix in [p for p, _ in self.merged.items() if p not in prefixes]:
            self.merged.delete(prefix)

    def refresh(self, prefixes: Iterable[str]) -> None:
        for prefix in set(prefixes):
            # The claims of this prefix and the clusters refused it before: the cost of one
            # prefix does not grow with the number of clusters in the mesh.
            claims = {e.cluster: e for e in self.claims.by("prefix", prefix)}
            row, refused = resolve(claims, self.owned, self.local_cluster)
            for cluster in claims.keys() | self.refused_at.get(prefix, set()):
                self._record(cluster, prefix, refused.get(cluster))
            if row is None:
                self.merged.delete(prefix)
            else:
                self.merged.upsert(row)

    def _record(self, cluster: str, prefix: str, why: str | None) -> None:
        current = self.refusals.get(cluster)
        if why is None:
            if current is not None and current.reasons.pop(prefix, None) is not None:
                log.info("remote=%s: claim for %s now applied or gone", cluster, prefix)
                refused = self.refused_at.get(prefix)
                if refused is not None:
                    refused.discard(cluster)
                    if not refused:
                        del self.refused_at[prefix]
            return
        self.refused_at.setdefault(prefix, set()).add(cluster)
        r = self.refusals.setdefault(cluster, Refusals())
        if r.reasons.get(prefix) != why:
            # While a cluster is still listing, its claims may come before its nodes.
            level = logging.WARNING if self.settled(cluster) else logging.DEBUG
            log.log(level, "remote=%s: refused claim: %s", cluster, why)
            r.reasons[prefix] = why
            r.last = why

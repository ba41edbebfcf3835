"""The mesh tables every feature reconciles from, and the keys to find them in the hive.

Writers: the clustermesh client (its own cluster's etcd and every remote cluster's).
Readers: BPF datapath, WireGuard peers, BGP. This node's own tables (local node, endpoints,
attributes) and the manifests table live in plexus.core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustermesh.models import ClusterService, Identity, IPIdentity, L4Addr, Node
from plexus.core.module import Key
from plexus.core.tables import Table

NodeKey = tuple[str, str]            # (cluster, node name)
Prefix = str                         # "10.1.1.5/32"
ServiceKey = tuple[str, str, str]    # (cluster, namespace, name)
ServiceName = tuple[str, str]        # (namespace, name)

# Index names: status counts, relists and drains look at one cluster's rows only.
BY_CLUSTER = "cluster"
BY_NAME = "name"  # services: the copies that merge into one global service


def _cluster(row: Any) -> str:
    return str(row.cluster)


@dataclass(frozen=True)
class Backend:
    ip: str
    ports: dict[str, L4Addr]
    cluster: str


@dataclass(frozen=True)
class GlobalService:
    """A service merged across every cluster that shares it, per its affinity."""

    namespace: str
    name: str
    frontends: dict[str, dict[str, L4Addr]]
    backends: tuple[Backend, ...]
    affinity: str = "none"  # local, remote, none

    @property
    def key(self) -> ServiceName:
        return (self.namespace, self.name)


def nodes_table() -> Table[NodeKey, Node]:
    return Table("nodes", key=lambda n: n.key, indexes={BY_CLUSTER: _cluster})


def ipcache_table() -> Table[Prefix, IPIdentity]:
    return Table("ipcache", key=lambda e: e.prefix, indexes={BY_CLUSTER: _cluster})


def identities_table() -> Table[int, Identity]:
    return Table("identities", key=lambda i: i.id, indexes={BY_CLUSTER: _cluster})


def services_table() -> Table[ServiceKey, ClusterService]:
    return Table("services", key=lambda s: s.key,
                 indexes={BY_CLUSTER: _cluster, BY_NAME: lambda s: (s.namespace, s.name)})


def global_services_table() -> Table[ServiceName, GlobalService]:
    return Table("global-services", key=lambda s: s.key)


NODES: Key[Table[NodeKey, Node]] = Key("nodes")                  # every cluster
IPCACHE: Key[Table[Prefix, IPIdentity]] = Key("ipcache")         # every cluster
IDENTITIES: Key[Table[int, Identity]] = Key("identities")        # every cluster
SERVICES: Key[Table[ServiceKey, ClusterService]] = Key("services")
GLOBAL_SERVICES: Key[Table[ServiceName, GlobalService]] = Key("global-services")

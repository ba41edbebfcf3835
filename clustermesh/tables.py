"""The merged tables every feature reconciles from, and the keys to find them in the hive.

Writers: the local node and endpoint manager (plexus), the clustermesh client (its own
cluster's etcd and every remote cluster's). Readers: BPF datapath, WireGuard peers, BGP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clustermesh.models import ClusterService, Identity, IPIdentity, L4Addr, Node
from plexus.core.module import Key
from plexus.core.tables import Table

NodeKey = tuple[str, str]            # (cluster, node name)
Prefix = str                         # "10.1.1.5/32"
ServiceKey = tuple[str, str, str]    # (cluster, namespace, name)
ServiceName = tuple[str, str]        # (namespace, name)
ManifestKey = tuple[str, str, str, str]  # (cluster, kind, namespace, name)


@dataclass(frozen=True)
class LocalNode:
    """This node, from the agent config: what it registers and where it sits."""

    cluster: str
    cluster_id: int
    name: str
    ip: str
    pod_cidr: str
    pod_cidr_v6: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    """A pod on this node, registered by the CNI plugin."""

    container_id: str
    ip: str
    namespace: str
    pod_name: str
    labels: dict[str, str]
    host_ifname: str
    netns: str = ""
    ifname: str = "eth0"
    ipv6: str | None = None

    @property
    def key(self) -> str:
        return self.container_id


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


@dataclass(frozen=True)
class NodeAttribute:
    """A field of this node's record set by a feature, e.g. ("WireguardPubKey", "<key>").

    The clustermesh module republishes the node record when these change.
    """

    name: str
    value: str


@dataclass(frozen=True)
class Manifest:
    """A user manifest applied with `plexus apply -f`, stored under `plexus/manifests/v1/`.

    `body` is the whole document; each feature validates the kinds it owns and reports
    a bad one in its status while it keeps running the last good one.
    """

    cluster: str
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]

    @property
    def key(self) -> ManifestKey:
        return (self.cluster, self.kind, self.namespace, self.name)


def nodes_table() -> Table[NodeKey, Node]:
    return Table("nodes", key=lambda n: n.key)


def ipcache_table() -> Table[Prefix, IPIdentity]:
    return Table("ipcache", key=lambda e: e.prefix)


def identities_table() -> Table[int, Identity]:
    return Table("identities", key=lambda i: i.id)


def services_table() -> Table[ServiceKey, ClusterService]:
    return Table("services", key=lambda s: s.key)


def global_services_table() -> Table[ServiceName, GlobalService]:
    return Table("global-services", key=lambda s: s.key)


def endpoints_table() -> Table[str, Endpoint]:
    return Table("endpoints", key=lambda e: e.key)


def node_attributes_table() -> Table[str, NodeAttribute]:
    return Table("node-attributes", key=lambda a: a.name)


def manifests_table() -> Table[ManifestKey, Manifest]:
    return Table("manifests", key=lambda m: m.key)


LOCAL_NODE: Key[LocalNode] = Key("local-node")
ENDPOINTS: Key[Table[str, Endpoint]] = Key("endpoints")          # local pods
NODES: Key[Table[NodeKey, Node]] = Key("nodes")                  # every cluster
IPCACHE: Key[Table[Prefix, IPIdentity]] = Key("ipcache")         # every cluster
IDENTITIES: Key[Table[int, Identity]] = Key("identities")        # every cluster
SERVICES: Key[Table[ServiceKey, ClusterService]] = Key("services")
GLOBAL_SERVICES: Key[Table[ServiceName, GlobalService]] = Key("global-services")
NODE_ATTRIBUTES: Key[Table[str, NodeAttribute]] = Key("node-attributes")  # this node's extras
MANIFESTS: Key[Table[ManifestKey, Manifest]] = Key("manifests")  # every cluster's

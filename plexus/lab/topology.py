"""The lab as data: segments, hosts, clusters, addresses. Everything else derives from it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

PREFIX = "plx-"
ROUTER = "plx-router"
ROUTER_ASN = 65000


@dataclass(frozen=True)
class Segment:
    name: str
    subnet: str

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen


@dataclass(frozen=True)
class Host:
    """A namespace with one leg into a segment."""

    netns: str
    segment: Segment
    ip: str
    role: str  # control-plane, node, vm, external

    @property
    def short(self) -> str:
        return self.netns.removeprefix(PREFIX)

    @property
    def router_link(self) -> str:
        return f"v-{self.short}"[:15]


@dataclass(frozen=True)
class Node:
    cluster: str
    name: str
    host: Host
    pod_cidr: str
    asn: int

    @property
    def key(self) -> str:
        return f"{self.cluster}-{self.name}"

    @property
    def wg_device(self) -> str:
        """WireGuard device name, unique on the machine (the UAPI socket dir is shared)."""
        return f"plxwg-{self.cluster[0]}{self.name.removeprefix('n')}"


@dataclass(frozen=True)
class Cluster:
    name: str
    id: int
    segment: Segment
    control_plane: Host
    nodes: tuple[Node, ...]
    service_cidr: str

    @property
    def etcd_url(self) -> str:
        return f"https://{self.control_plane.ip}:2379"


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    clusters: tuple[Cluster, ...]
    vms: tuple[Host, ...]
    external: tuple[Host, ...]
    extra: dict[str, str] = field(default_factory=dict)

    def hosts(self) -> list[Host]:
        out: list[Host] = []
        for c in self.clusters:
            out.append(c.control_plane)
            out.extend(n.host for n in c.nodes)
        return out + list(self.vms) + list(self.external)

    def nodes(self) -> list[Node]:
        return [n for c in self.clusters for n in c.nodes]

    def node(self, cluster: str, name: str) -> Node:
        for n in self.nodes():
            if n.cluster == cluster and n.name == name:
                return n
        known = ", ".join(f"{n.cluster} {n.name}" for n in self.nodes())
        raise KeyError(f"no lab node {cluster} {name} (known: {known})")

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(f"no lab cluster {name}")

    def namespaces(self) -> list[str]:
        return [ROUTER] + [h.netns for h in self.hosts()]


POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?$")


def pod_netns(node: Node, pod: str) -> str:
    return f"{PREFIX}{node.key}-{pod}"


def is_lab_netns(name: str, topo: Topology) -> bool:
    """Namespaces the lab makes: its hosts, the router, and pods under its nodes."""
    if name in topo.namespaces():
        return True
    return any(name.startswith(f"{PREFIX}{n.key}-") for n in topo.nodes())


def default() -> Topology:
    east = Segment("east", "172.31.1.0/24")
    west = Segment("west", "172.31.2.0/24")
    vm = Segment("vm", "172.31.3.0/24")
    ext = Segment("ext", "198.51.100.0/24")

    def cluster(name: str, cid: int, seg: Segment, octet: int) -> Cluster:
        cp = Host(f"{PREFIX}{name}-cp", seg, f"172.31.{octet}.250", "control-plane")
        nodes = tuple(
            Node(name, f"n{i}", Host(f"{PREFIX}{name}-n{i}", seg, f"172.31.{octet}.{10 + i}", "node"),
                 f"10.{octet}.{i}.0/24", 65000 + cid)
            for i in (1, 2))
        return Cluster(name, cid, seg, cp, nodes, f"10.96.{octet}.0/24")

    return Topology(
        segments=(east, west, vm, ext),
        clusters=(cluster("east", 1, east, 1), cluster("west", 2, west, 2)),
        vms=(Host(f"{PREFIX}vm1", vm, "172.31.3.10", "vm"),),
        external=(Host(f"{PREFIX}ext", ext, "198.51.100.10", "external"),),
    )

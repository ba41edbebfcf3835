"""The lab as data: segments, hosts, clusters, addresses. Everything else derives from it."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

PREFIX = "plx-"
ROUTER = "plx-router"
ROUTER_ASN = 65000
ETCD_MEMBER_COUNTS = (1, 3, 5)  # odd: an even count tolerates no more failures than one less


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
class EtcdMember:
    """One member of a cluster's etcd, on its own address in the control-plane namespace."""

    name: str  # etcd's --name
    ip: str

    @property
    def url(self) -> str:
        return f"https://{self.ip}:2379"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:2380"

    @property
    def process(self) -> str:
        """The name the lab records its PID under."""
        return f"etcd-{self.name}"


@dataclass(frozen=True)
class Cluster:
    name: str
    id: int
    segment: Segment
    control_plane: Host
    nodes: tuple[Node, ...]
    service_cidr: str
    etcd_members: int = 1

    @property
    def etcd_url(self) -> str:
        """The first member's endpoint (the only one with a single member)."""
        return f"https://{self.control_plane.ip}:2379"

    @property
    def etcd(self) -> tuple[EtcdMember, ...]:
        """The members: one is named after the cluster; several are `<cluster>-<i>` on the
        control plane's address and the ones after it."""
        if self.etcd_members == 1:
            return (EtcdMember(self.name, self.control_plane.ip),)
        first = ipaddress.ip_address(self.control_plane.ip)
        return tuple(EtcdMember(f"{self.name}-{i}", str(first + i)) for i in range(self.etcd_members))

    @property
    def etcd_urls(self) -> list[str]:
        return [m.url for m in self.etcd]


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


def with_etcd_members(topo: Topology, members: int | Mapping[str, int]) -> Topology:
    """`topo` with `members` etcd members in every cluster (an int) or in the named ones."""
    wanted = {c.name: members for c in topo.clusters} if isinstance(members, int) else dict(members)
    unknown = set(wanted) - {c.name for c in topo.clusters}
    if unknown:
        raise KeyError(f"no lab cluster {', '.join(sorted(unknown))}")
    for name, count in wanted.items():
        if count not in ETCD_MEMBER_COUNTS:
            raise ValueError(f"cluster {name}: {count} etcd members; one of "
                             f"{', '.join(map(str, ETCD_MEMBER_COUNTS))}")
        c = topo.cluster(name)
        last = ipaddress.ip_address(c.control_plane.ip) + count - 1
        if last not in ipaddress.ip_network(c.segment.subnet) or int(last) & 0xFF == 0xFF:
            raise ValueError(f"cluster {name}: {count} etcd members do not fit after "
                             f"{c.control_plane.ip} in {c.segment.subnet}")
    return dataclasses.replace(topo, clusters=tuple(
        dataclasses.replace(c, etcd_members=wanted.get(c.name, c.etcd_members))
        for c in topo.clusters))


POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?$")


def pod_netns(node: Node, pod: str) -> str:
    return f"{PREFIX}{node.key}-{pod}"


def is_lab_netns(name: str, topo: Topology) -> bool:
    """Namespaces the lab makes: its hosts, the router, and pods under its nodes."""
    if name in topo.namespaces():
        return True
    return any(name.startswith(f"{PREFIX}{n.key}-") for n in topo.nodes())


def default(etcd_members: int | Mapping[str, int] = 1) -> Topology:
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

    topo = Topology(
        segments=(east, west, vm, ext),
        clusters=(cluster("east", 1, east, 1), cluster("west", 2, west, 2)),
        vms=(Host(f"{PREFIX}vm1", vm, "172.31.3.10", "vm"),),
        external=(Host(f"{PREFIX}ext", ext, "198.51.100.10", "external"),),
    )
    return topo if etcd_members == 1 else with_etcd_members(topo, etcd_members)

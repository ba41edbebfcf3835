"""Desired egress state, derived from the mesh tables and the policies (pure functions).

- `mesh_endpoints`: every endpoint of every cluster (ipcache + identity labels) with the
  node it runs on;
- `resolve_policy`: per policy, the endpoints it selects and its candidate gateway nodes in
  preference order, with what keeps a gateway from holding its egress IP;
- `entries`: per (source endpoint IP, destination CIDR) what the datapath needs (gateway
  node and egress IP, or "excluded"), with conflicts between policies reported.

The active gateway of each (policy, source node) is chosen in `egress.failover` from the
gateway health table, which a per-source-node prober and the control plane fill.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh.models import (
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    LABEL_NAMESPACE_LABELS,
    LABEL_NAMESPACE_NAME,
    Identity,
    IPIdentity,
    Node,
)
from clustermesh.tables import NodeKey
from egress.models import EgressGatewayPolicy, IPNetwork
from plexus.core.module import Key
from plexus.core.tables import Table

PolicyKey = tuple[str, str, str]           # (cluster, namespace, name) of the manifest
EntryKey = tuple[str, str]                 # (source endpoint IP, destination CIDR)
ActiveKey = tuple[PolicyKey, NodeKey | None]
HealthKey = tuple[str, NodeKey]            # (reporter, gateway node)
LABEL_HOSTNAME = "kubernetes.io/hostname"
CONTROL_PLANE = "control-plane"            # the reporter that speaks for every source node
# Health crosses the mesh on node records, which every cluster follows already:
ANNOTATION_PROBES = "egress.plexus.io/gateway-probes"          # a source node's verdicts
ANNOTATION_CONTROL_PLANE = "egress.plexus.io/control-plane-unreachable"  # why, by its control plane
ANNOTATION_INTERFACES = "egress.plexus.io/interface-addresses"  # a gateway's named interfaces
ANNOTATION_UNAVAILABLE = "egress.plexus.io/gateway-unavailable"  # why a node cannot translate
MAX_REPORTED = 64  # gateways read from one node's annotation: a hostile record stays small
SHOWN_SOURCES = 3                          # endpoints a conflict line names
MIN_ENDPOINT_IDENTITY = 256                # below: reserved identities (host, world, ...)


def reporter_of(node: NodeKey) -> str:
    """The reporter name a source node's own prober writes its health rows under."""
    return f"{node[0]}/{node[1]}"


def policy_name(key: PolicyKey) -> str:
    return "/".join(key)


def node_name(node: NodeKey | None) -> str:
    return "/".join(node) if node else ""


# ---- rows ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeshEndpoint:
    """An endpoint of any cluster, with the labels selectors see."""

    ip: str
    cluster: str
    namespace: str
    pod: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]
    node: NodeKey | None  # the node it runs on (by its ipcache host IP), if known
    identity: int = 0     # endpoints of one identity (and namespace) share their labels


@dataclass(frozen=True)
class GatewayCandidate:
    """A node that may be the gateway, with the address traffic leaves with there."""

    node: NodeKey
    entry: int                   # index into spec.egressGateways
    egress_ip: str | None        # None: the first address of `interface` on the gateway
    interface: str | None = None


@dataclass(frozen=True)
class PolicyState:
    """One policy as this agent resolves it: what it selects and where it may leave."""

    key: PolicyKey
    created: float  # age order: metadata.creationTimestamp, else when this agent first saw it
    endpoints: tuple[MeshEndpoint, ...]
    gateways: tuple[GatewayCandidate, ...]
    destinations: tuple[str, ...]
    excluded: tuple[str, ...]
    problems: tuple[str, ...] = ()              # gateways that cannot hold their egress IP
    conflicts: tuple[str, ...] = ()             # where another policy wins or shadows it


@dataclass(frozen=True)
class GatewayHealth:
    """What one reporter (a source node's prober, or the control plane) says of a gateway."""

    reporter: str
    gateway: NodeKey
    healthy: bool
    since: float = 0.0   # monotonic time of the last change, from the reporter's clock
    reason: str = ""

    @property
    def key(self) -> HealthKey:
        return (self.reporter, self.gateway)


@dataclass(frozen=True)
class ActiveGateway:
    """The gateway a source node's traffic of one policy leaves through now."""

    policy: PolicyKey
    source: NodeKey | None
    gateway: GatewayCandidate | None  # None: no healthy gateway (drop, never leak)
    since: float

    @property
    def key(self) -> ActiveKey:
        return (self.policy, self.source)


@dataclass(frozen=True)
class EgressEntry:
    """What the datapath on the source's node needs for (source IP, destination)."""

    source_ip: str
    destination: str
    policy: PolicyKey
    source_node: NodeKey | None
    excluded: bool = False                 # leaves as before: an excludedCIDR
    gateway: NodeKey | None = None         # None and not excluded: drop (no-egress-gateway)
    egress_ip: str | None = None
    interface: str | None = None

    @property
    def key(self) -> EntryKey:
        return (self.source_ip, self.destination)


def policies_table() -> Table[PolicyKey, PolicyState]:
    return Table("egress-policies", key=lambda p: p.key)


def health_table() -> Table[HealthKey, GatewayHealth]:
    return Table("egress-gateway-health", key=lambda h: h.key)


def active_table() -> Table[ActiveKey, ActiveGateway]:
    return Table("egress-active-gateways", key=lambda a: a.key)


BY_SOURCE = "source"


def entries_table() -> Table[EntryKey, EgressEntry]:
    return Table("egress-entries", key=lambda e: e.key, indexes={BY_SOURCE: lambda e: e.source_ip})


GATEWAY_HEALTH: Key[Table[HealthKey, GatewayHealth]] = Key("egress-gateway-health")
EGRESS_ENTRIES: Key[Table[EntryKey, EgressEntry]] = Key("egress-entries")


# ---- health across the mesh ------------------------------------------------------------------

def format_verdicts(verdicts: Mapping[NodeKey, bool]) -> str:
    """A source node's probe verdicts as its record carries them: `east/n2=up,west/n2=down`."""
    return ",".join(f"{node_name(gw)}={'up' if up else 'down'}" for gw, up in sorted(verdicts.items()))


def parse_verdicts(value: str) -> dict[NodeKey, bool]:
    """The verdicts of `format_verdicts`; a malformed item is skipped, never fatal."""
    out: dict[NodeKey, bool] = {}
    for item in value.split(",")[:MAX_REPORTED]:
        name, _, verdict = item.partition("=")
        cluster, _, node = name.partition("/")
        if cluster and node and verdict in ("up", "down"):
            out[(cluster, node)] = verdict == "up"
    return out


def format_interfaces(addresses: Mapping[str, str | None]) -> str:
    """A gateway's named interfaces and their first IPv4 address: `eth1=10.0.0.5,eth9=`."""
    return ",".join(f"{name}={ip or ''}" for name, ip in sorted(addresses.items()))


def parse_interfaces(value: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in value.split(",")[:MAX_REPORTED]:
        name, sep, ip = item.partition("=")
        if not sep or not name:
            continue
        try:
            out[name] = str(ipaddress.IPv4Address(ip)) if ip else None
        except ValueError:
            continue
    return out


def mesh_health(nodes: Iterable[Node], gateways: set[NodeKey], me: NodeKey) -> list[GatewayHealth]:
    """What other nodes' records say of `gateways`: each source node's own verdicts (its
    probes; this node's come from its own prober, fresher than its record) and, from the
    control plane of the gateway's cluster, why it cannot reach it."""
    out: list[GatewayHealth] = []
    for n in nodes:
        notes = n.annotations
        if n.key != me and (probes := notes.get(ANNOTATION_PROBES)):
            reporter = reporter_of(n.key)
            out.extend(GatewayHealth(reporter, gw, up, reason=f"probes of {node_name(n.key)}")
                       for gw, up in parse_verdicts(probes).items() if gw in gateways)
        if n.key in gateways and (why := notes.get(ANNOTATION_CONTROL_PLANE)):
            out.append(GatewayHealth(CONTROL_PLANE, n.key, False, reason=why[:200]))
    return out


# ---- endpoints and nodes -------------------------------------------------------------------

def node_labels(node: Node) -> dict[str, str]:
    """A node's labels as nodeSelectors see them: its name and cluster always present."""
    return {LABEL_HOSTNAME: node.name, **node.labels, LABEL_CLUSTER: node.cluster}


def _node_by_address(nodes: Iterable[Node]) -> dict[str, NodeKey]:
    out: dict[str, NodeKey] = {}
    for n in nodes:
        for a in n.addresses:
            out.setdefault(a.ip, n.key)
    return out


class EndpointReader:
    """Reads ipcache rows as the endpoints selectors see, with the labels of each identity
    (and namespace, cluster) built once and shared."""

    def __init__(self, identities: Mapping[int, Identity], nodes: Iterable[Node]) -> None:
        self.identities = identities
        self.where = _node_by_address(nodes)
        self.shared: dict[tuple[int, str, str], tuple[dict[str, str], dict[str, str]]] = {}

    def read(self, e: IPIdentity) -> MeshEndpoint | None:
        ident = self.identities.get(e.identity)
        if e.identity < MIN_ENDPOINT_IDENTITY or ident is None or e.prefix_len is not None:
            return None  # hosts, world, CIDRs; or labels not known yet
        once = (e.identity, e.namespace, e.cluster)
        if once not in self.shared:
            prefix = LABEL_NAMESPACE_LABELS + "."
            labels = ident.label_map()
            ns_labels = {k[len(prefix):]: v for k, v in labels.items() if k.startswith(prefix)}
            namespace = e.namespace or labels.get(LABEL_NAMESPACE, "")
            if namespace:
                ns_labels.setdefault(LABEL_NAMESPACE_NAME, namespace)
            pod = {k: v for k, v in labels.items() if not k.startswith(prefix)}
            pod.setdefault(LABEL_CLUSTER, e.cluster or ident.cluster)
            self.shared[once] = (pod, ns_labels)
        pod, ns_labels = self.shared[once]
        return MeshEndpoint(ip=e.ip, cluster=pod[LABEL_CLUSTER],
                            namespace=ns_labels.get(LABEL_NAMESPACE_NAME, ""),
                            pod=e.pod_name, labels=pod, namespace_labels=ns_labels,
                            node=self.where.get(e.host_ip), identity=e.identity)


def mesh_endpoints(ipcache: Iterable[IPIdentity], identities: Mapping[int, Identity],
                   nodes: Iterable[Node]) -> list[MeshEndpoint]:
    """Every pod of every cluster whose identity is known, in address order."""
    reader = EndpointReader(identities, nodes)
    out = [m for e in ipcache if (m := reader.read(e)) is not None]
    return sorted(out, key=lambda m: _address_order(m.ip))


GroupKey = tuple[int, str, str]  # (identity, namespace, cluster): endpoints selectors see alike


def group_key(e: MeshEndpoint) -> GroupKey:
    # an endpoint without an identity is a group of its own
    return (e.identity, e.namespace, e.cluster) if e.identity else (0, e.ip, "")


def group_endpoints(endpoints: Iterable[MeshEndpoint]) -> dict[GroupKey, list[MeshEndpoint]]:
    out: dict[GroupKey, list[MeshEndpoint]] = {}
    for e in endpoints:
        out.setdefault(group_key(e), []).append(e)
    return out


class MeshIndex:
    """Every endpoint of the mesh by group, kept from one recompute to the next: a changed
    ipcache row is read again alone; a change of nodes or identities reads every row."""

    def __init__(self, ipcache: Table[Any, IPIdentity] | None,
                 identities: Table[int, Identity] | None, nodes: Table[Any, Node] | None) -> None:
        self.ipcache, self.identities, self.nodes = ipcache, identities, nodes
        self._rows_changed = ipcache.track() if ipcache is not None else None
        self._all_changed = [t.track() for t in (identities, nodes) if t is not None]
        self._reader: EndpointReader | None = None
        self.rows: dict[Any, MeshEndpoint] = {}
        self.groups: dict[GroupKey, dict[Any, MeshEndpoint]] = {}

    def forget(self) -> None:
        """Drop everything (nothing needs it now): the next refresh reads every row."""
        for t in (self._rows_changed, *self._all_changed):
            if t is not None:
                t.take()
        self._reader = None
        self.rows, self.groups = {}, {}

    def refresh(self) -> list[MeshEndpoint] | None:
        """Bring the index up to date; returns the endpoints that changed, as they were and
        as they are (None: every row was read again)."""
        rows = self._rows_changed.take() if self._rows_changed is not None else set()
        if any([t.take() for t in self._all_changed]) or self._reader is None:
            self._rebuild()
            return None
        touched: list[MeshEndpoint] = []
        for key in rows:
            if (old := self._remove(key)) is not None:
                touched.append(old)
            row = self.ipcache.get(key) if self.ipcache is not None else None
            if row is not None and (e := self._reader.read(row)) is not None:
                self._add(key, e)
                touched.append(e)
        return touched

    def _rebuild(self) -> None:
        self._reader = EndpointReader({i.id: i for i in self.identities or []}, self.nodes or [])
        self.rows, self.groups = {}, {}
        for key, row in (self.ipcache.items() if self.ipcache is not None else []):
            if (e := self._reader.read(row)) is not None:
                self._add(key, e)

    def _add(self, key: Any, e: MeshEndpoint) -> None:
        self.rows[key] = e
        self.groups.setdefault(group_key(e), {})[key] = e

    def _remove(self, key: Any) -> MeshEndpoint | None:
        old = self.rows.pop(key, None)
        if old is not None:
            group = self.groups[group_key(old)]
            del group[key]
            if not group:
                del self.groups[group_key(old)]
        return old


@functools.lru_cache(maxsize=1 << 18)
def _address_order(ip: str) -> tuple[int, bytes]:
    """IPv4 before IPv6, then numerically (inet_pton: ipaddress is ten times slower)."""
    if ":" in ip:
        return (6, socket.inet_pton(socket.AF_INET6, ip))
    return (4, socket.inet_pton(socket.AF_INET, ip))


# ---- one policy ------------------------------------------------------------------------------

def selects(policy: EgressGatewayPolicy, ep: MeshEndpoint) -> bool:
    for s in policy.spec.selectors:
        if s.pod_selector is not None and not s.pod_selector.matches(dict(ep.labels)):
            continue
        if s.namespace_selector is not None and not s.namespace_selector.matches(
                dict(ep.namespace_labels)):
            continue
        return True
    return False


Groups = Mapping[GroupKey, Mapping[Any, MeshEndpoint]] | Mapping[GroupKey, list[MeshEndpoint]]


def selected(policy: EgressGatewayPolicy, groups: Groups) -> tuple[MeshEndpoint, ...]:
    """The endpoints `policy` selects, in address order; tested once per group."""
    out: list[MeshEndpoint] = []
    for members in groups.values():
        found = members.values() if isinstance(members, Mapping) else members
        first = next(iter(found), None)
        if first is not None and selects(policy, first):
            out.extend(found)
    return tuple(sorted(out, key=lambda m: _address_order(m.ip)))


def _pod_cidrs(n: Node) -> list[IPNetwork]:
    return [net for c in (n.ipv4_alloc_cidr, n.ipv6_alloc_cidr, *n.secondary_alloc_cidrs)
            if c and (net := _network(c)) is not None]


@functools.lru_cache(maxsize=1 << 17)
def _network(cidr: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None


def _held_elsewhere(ip: str, gateway: NodeKey | None, nodes: list[Node]) -> str | None:
    """Why `ip` cannot move to `gateway` (None: to whichever is active): it belongs to
    another node or sits in a node's pod CIDR."""
    addr = ipaddress.ip_address(ip)
    for n in nodes:
        if n.key == gateway:
            continue
        if any(a.ip == ip for a in n.addresses):
            return f"{ip} is an address of node {node_name(n.key)}"
        for net in _pod_cidrs(n):
            if addr.version == net.version and addr in net:
                return f"{ip} lies in the pod CIDR {net} of node {node_name(n.key)}"
    return None


Gateways = tuple[tuple[GatewayCandidate, ...], tuple[str, ...]]  # candidates, problems


def resolve_policy(key: PolicyKey, created: float, policy: EgressGatewayPolicy,
                   endpoints: Iterable[MeshEndpoint] | MeshIndex, nodes: Iterable[Node],
                   gateways: Gateways | None = None) -> PolicyState:
    """What one policy selects and where its traffic may leave, in preference order
    (`gateways`: what `resolve_gateways` gave for these nodes, when already known)."""
    candidates, problems = gateways if gateways is not None else resolve_gateways(policy, nodes)
    spec = policy.spec
    return PolicyState(
        key=key, created=created,
        endpoints=selected(policy, endpoints.groups if isinstance(endpoints, MeshIndex)
                           else group_endpoints(endpoints)),
        gateways=candidates, destinations=tuple(str(c) for c in spec.destination_cidrs),
        excluded=tuple(str(c) for c in spec.excluded_cidrs), problems=problems)


def resolve_gateways(policy: EgressGatewayPolicy, nodes: Iterable[Node]) -> Gateways:
    """Where one policy's traffic may leave, in preference order, and what keeps a gateway
    out. A node that several gateway entries select keeps its first place; an entry's nodes
    are taken in (cluster, name) order. A gateway that cannot hold its egress IP is left
    out and reported on that entry. Depends on the policy and the nodes only."""
    nodes = sorted(nodes, key=lambda n: n.key)
    by_name: dict[str, list[Node]] = {}
    for n in nodes:
        by_name.setdefault(node_labels(n)[LABEL_HOSTNAME], []).append(n)
    spec = policy.spec
    problems: list[str] = []
    if spec.egress_ip is not None and (why := _held_elsewhere(str(spec.egress_ip), None, nodes)):
        problems.append(f"spec.egressIP: {why}; it cannot follow the active gateway")
    gateways: list[GatewayCandidate] = []
    taken: set[NodeKey] = set()
    for i, gw in enumerate(spec.egress_gateways):
        # a hostname in matchLabels (the usual form) narrows the nodes to look at
        name = (gw.node_selector.match_labels or {}).get(LABEL_HOSTNAME)
        matched = [n for n in (by_name.get(name, []) if name is not None else nodes)
                   if gw.node_selector.matches(node_labels(n))]
        if not matched:
            problems.append(f"spec.egressGateways[{i}].nodeSelector: selects no node")
        for n in matched:
            if n.key in taken:
                continue
            if why := n.annotations.get(ANNOTATION_UNAVAILABLE):
                problems.append(f"spec.egressGateways[{i}]: gateway {node_name(n.key)} cannot "
                                f"translate: {why[:200]}")
                continue
            ip: str | None = str(spec.egress_ip or gw.egress_ip or "") or None
            if gw.egress_ip is not None and (why := _held_elsewhere(str(gw.egress_ip), n.key, nodes)):
                problems.append(f"spec.egressGateways[{i}].egressIP: {why}, so gateway "
                                f"{node_name(n.key)} cannot hold it")
                continue
            if ip is None and gw.interface is None:
                ip = n.internal_ip()  # Cilium's default: the gateway's own address
            elif ip is None and gw.interface is not None:
                # what the gateway says its interface holds; not said yet: it decides alone
                published = parse_interfaces(n.annotations.get(ANNOTATION_INTERFACES, ""))
                if gw.interface in published:
                    ip = published[gw.interface]
                    if ip is None:
                        problems.append(f"spec.egressGateways[{i}].interface: {gw.interface} has "
                                        f"no IPv4 address on gateway {node_name(n.key)}")
                        continue
            taken.add(n.key)
            gateways.append(GatewayCandidate(n.key, i, ip, gw.interface))
    return tuple(gateways), tuple(problems)


# ---- entries across policies -----------------------------------------------------------------

@dataclass
class Derived:
    entries: list[EgressEntry] = field(default_factory=list)
    # per policy: what wins over it -> the source endpoint IPs it happens for
    sources: dict[PolicyKey, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def conflicts(self) -> dict[PolicyKey, list[str]]:
        """One line per policy and reason, naming a few of the endpoints it concerns."""
        out: dict[PolicyKey, list[str]] = {}
        for policy, whats in self.sources.items():
            for what, ips in whats.items():
                shown = ", ".join(ips[:SHOWN_SOURCES])
                more = f" and {len(ips) - SHOWN_SOURCES} more" if len(ips) > SHOWN_SOURCES else ""
                out.setdefault(policy, []).append(f"{what} (from {shown}{more})")
        return out


def age_order(p: PolicyState) -> tuple[float, PolicyKey]:
    """Older first; policies created in the same second are ordered by key (stable)."""
    return (p.created, p.key)


def entries(policies: Iterable[PolicyState],
            active: Mapping[ActiveKey, ActiveGateway]) -> Derived:
    """Every (source IP, destination) entry, with the rules that decide between policies:

    - an excludedCIDR of any policy selecting the pod beats a destinationCIDR equal to it;
    - for the same (pod, CIDR), the older policy wins; the younger is told so;
    - between different CIDRs the longest prefix wins in the datapath (LPM); a policy whose
      destination a more specific one of another policy covers is told so;
    - a pod's address pairs only with destinations of its own family.
    """
    out = Derived()
    by_key: dict[EntryKey, EgressEntry] = {}
    ordered = sorted(policies, key=age_order)
    for p in ordered:
        dests = [(d, ipaddress.ip_network(d).version) for d in p.destinations]
        excluded = [(d, ipaddress.ip_network(d).version) for d in p.excluded]
        for ep in p.endpoints:
            act = active.get((p.key, ep.node))
            gw = act.gateway if act else None
            family = 6 if ":" in ep.ip else 4
            for dest, version in dests:
                if version == family:
                    _put(out, by_key, EgressEntry(
                        ep.ip, dest, p.key, ep.node, gateway=gw.node if gw else None,
                        egress_ip=gw.egress_ip if gw else None,
                        interface=gw.interface if gw else None))
            for dest, version in excluded:
                if version == family:
                    _put(out, by_key, EgressEntry(ep.ip, dest, p.key, ep.node, excluded=True))
    _shadowed(out, by_key.values())
    nets = {d: ipaddress.ip_network(d) for d in {e.destination for e in by_key.values()}}
    out.entries = sorted(by_key.values(), key=lambda e: (_address_order(e.source_ip),
                                                         nets[e.destination].version,
                                                         nets[e.destination]))
    return out


def _put(out: Derived, by_key: dict[EntryKey, EgressEntry], e: EgressEntry) -> None:
    old = by_key.get(e.key)
    if old is None:
        by_key[e.key] = e
        return
    if old.policy == e.policy:
        if e.excluded and not old.excluded:
            by_key[e.key] = e  # a policy that excludes its own destination: excluded wins
        return
    if e.excluded and not old.excluded:
        by_key[e.key] = e
        _conflict(out, old.policy, e.source_ip,
                  f"{e.destination}: excluded by {policy_name(e.policy)}, which wins")
    elif not e.excluded and not old.excluded:
        _conflict(out, e.policy, e.source_ip,
                  f"{e.destination}: the older policy {policy_name(old.policy)} wins")


def _shadowed(out: Derived, all_entries: Iterable[EgressEntry]) -> None:
    steered: dict[str, list[EgressEntry]] = {}
    for e in all_entries:
        if not e.excluded:
            steered.setdefault(e.source_ip, []).append(e)
    nets: dict[str, IPNetwork] = {}
    for source, es in steered.items():
        if len({e.policy for e in es}) < 2:
            continue  # one policy: nothing to shadow
        for e in es:
            if e.destination not in nets:
                nets[e.destination] = ipaddress.ip_network(e.destination)
        for a in es:
            na = nets[a.destination]
            for b in es:
                nb = nets[b.destination]
                if (a.policy != b.policy and na.version == nb.version
                        and nb.prefixlen > na.prefixlen and nb.subnet_of(na)):  # type: ignore[arg-type]
                    _conflict(out, a.policy, source,
                              f"{b.destination}: the more specific destination of "
                              f"{policy_name(b.policy)} wins within {a.destination}")


def _conflict(out: Derived, policy: PolicyKey, source: str, what: str) -> None:
    ips = out.sources.setdefault(policy, {}).setdefault(what, [])
    if source not in ips:
        ips.append(source)

"""What BGP wants: neighbors for ExaBGP's config and the routes desired per peer.

`resolve` turns manifests, the local node and services into typed rows; it is pure so the
module and the tests call the same thing. A manifest that fails validation is reported
and its last good version (if any) keeps being used.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from bgp.models import (
    WELL_KNOWN,
    Advertisement,
    BGPAdvertisement,
    BGPClusterConfig,
    BGPNodeConfigOverride,
    BGPPeerConfig,
    ClusterPeer,
    Instance,
    PeerConfigSpec,
    large_community,
    standard_community,
)
from clustermesh.manifests import Service
from clustermesh.models import (
    SERVICE_LABEL_EXTERNAL_IPS,
    SERVICE_LABEL_LB_IP,
    SERVICE_LABEL_TRAFFIC_POLICY,
    ClusterService,
    L4Addr,
)
from plexus.core.manifests import ManifestCache
from plexus.core.node import Endpoint, LocalNode
from plexus.core.tables import Table

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LB_IP_LABEL = SERVICE_LABEL_LB_IP
EXTERNAL_IPS_LABEL = SERVICE_LABEL_EXTERNAL_IPS
TRAFFIC_POLICY_LABEL = SERVICE_LABEL_TRAFFIC_POLICY


@dataclass(frozen=True, order=True)
class RouteAttrs:
    """Path attributes of one announced prefix. The next hop is self (the session's local
    address) unless the prefix is of the other family than the session: then it is this
    node's address of the prefix's family (MP-BGP, e.g. IPv6 routes over an IPv4 session)."""

    communities: tuple[tuple[int, int], ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    local_pref: int | None = None
    next_hop: IPAddress | None = None
    as_path: tuple[int, ...] = ()  # sent as it is; empty: the default (our AS once on eBGP)

    def merge(self, other: RouteAttrs) -> RouteAttrs:
        """Overlapping advertisements: union communities, highest local preference, the
        longer AS path."""
        prefs = [p for p in (self.local_pref, other.local_pref) if p is not None]
        return RouteAttrs(
            tuple(sorted(set(self.communities) | set(other.communities))),
            tuple(sorted(set(self.large_communities) | set(other.large_communities))),
            max(prefs) if prefs else None, self.next_hop or other.next_hop,
            max(self.as_path, other.as_path, key=len))


@dataclass(frozen=True)
class Neighbor:
    """One BGP session of this node, as rendered into ExaBGP's config."""

    peer_address: IPAddress
    peer_asn: int
    local_asn: int
    router_id: ipaddress.IPv4Address
    local_address: IPAddress
    instance: str = "default"
    name: str = ""
    port: int = 179
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 120
    multihop: int = 1
    password: str | None = field(default=None, repr=False)
    graceful_restart: int | None = 120
    families: tuple[str, ...] = ("ipv4", "ipv6")

    @property
    def key(self) -> IPAddress:
        return self.peer_address


@dataclass(frozen=True)
class PeerRoutes:
    """The routes desired towards one peer: prefix -> attributes."""

    peer: IPAddress
    routes: dict[IPNetwork, RouteAttrs]

    @property
    def key(self) -> IPAddress:
        return self.peer


def peer_routes_table() -> Table[IPAddress, PeerRoutes]:
    return Table("bgp-peer-routes", key=lambda r: r.key)


def neighbors_table() -> Table[IPAddress, Neighbor]:
    """This node's BGP sessions, one row per peer address; the speaker runs exactly these."""
    return Table("bgp-neighbors", key=lambda n: n.key)


@dataclass
class Resolved:
    neighbors: dict[IPAddress, Neighbor]
    routes: dict[IPAddress, dict[IPNetwork, RouteAttrs]]
    problems: dict[str, str]


def read_password(spec: PeerConfigSpec, secrets_dir: Path) -> str | None:
    path = None
    if spec.auth_password_file:
        path = Path(spec.auth_password_file)
    elif spec.auth_secret_ref:
        path = secrets_dir / spec.auth_secret_ref
    if path is None:
        return None
    try:
        pw = path.read_text().strip("\n")
    except OSError as e:
        raise ValueError(f"cannot read password file {path}: {e.strerror}") from None
    if not pw or len(pw) > 80 or any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\"\\" for c in pw):
        raise ValueError(f"password in {path} must be 1..80 printable characters without quotes")
    return pw


def attrs_of(adv: Advertisement) -> RouteAttrs:
    c = adv.attributes.communities
    std = {standard_community(x) for x in c.standard} | {WELL_KNOWN[w] for w in c.well_known}
    return RouteAttrs(tuple(sorted(std)), tuple(sorted({large_community(x) for x in c.large})),
                      adv.attributes.local_preference)


def service_prefixes(adv: Advertisement, services: Iterable[ClusterService],
                     local: LocalNode) -> list[IPNetwork]:
    assert adv.service is not None
    pod_nets = [ipaddress.ip_network(c) for c in (local.pod_cidr, local.pod_cidr_v6) if c]
    out: list[IPNetwork] = []
    for svc in services:
        if svc.cluster != local.cluster:
            continue
        if adv.selector is not None and not adv.selector.matches(svc.labels):
            continue
        if svc.labels.get(TRAFFIC_POLICY_LABEL) == "Local":
            backends = [ipaddress.ip_address(b) for b in svc.backends]
            if not any(b in n for b in backends for n in pod_nets if b.version == n.version):
                continue
        for kind in adv.service.addresses:
            if kind == "ClusterIP":
                out += [host_prefix(f) for f in svc.frontends]
            elif kind == "LoadBalancerIP":
                out += _host_prefixes(svc.labels.get(LB_IP_LABEL, ""))
            else:
                out += _host_prefixes(svc.labels.get(EXTERNAL_IPS_LABEL, ""))
    return out


@functools.lru_cache(maxsize=1 << 18)
def host_prefix(address: str) -> IPNetwork:
    """The /32 or /128 of an address (ValueError if it is none). Kept: with 100,000 services,
    parsing every address again on each recompute costs seconds."""
    if "/" in address:
        raise ValueError(f"{address!r} is not an address")
    return ipaddress.ip_network(address)


def _host_prefixes(text: str) -> list[IPNetwork]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                out.append(host_prefix(part))
            except ValueError:
                continue
    return out


def local_service(svc: Service, local: LocalNode, endpoints: Iterable[Endpoint]) -> ClusterService:
    """A Service manifest of this node's cluster, global or not, as the record BGP reads:
    its addresses, and as backends the pods of this node it selects and its explicit ones
    (all that `externalTrafficPolicy: Local` asks about)."""
    spec = svc.spec
    ports = {p.name or str(p.port): L4Addr(p.protocol, p.port) for p in spec.ports}
    frontends = {str(ip): ports for ip in [spec.cluster_ip, spec.load_balancer_ip, *spec.external_ips]
                 if ip is not None}
    backends: dict[str, dict[str, L4Addr]] = {}
    if spec.selector:
        for ep in endpoints:
            if ep.namespace == svc.metadata.namespace and all(
                    ep.labels.get(k) == v for k, v in spec.selector.items()):
                backends.update({ip: ports for ip in (ep.ip, ep.ipv6) if ip})
    backends.update({str(b.ip): ports for b in spec.backends})
    labels = {**svc.metadata.labels, TRAFFIC_POLICY_LABEL: spec.external_traffic_policy}
    if spec.load_balancer_ip is not None:
        labels[LB_IP_LABEL] = str(spec.load_balancer_ip)
    if spec.external_ips:
        labels[EXTERNAL_IPS_LABEL] = ",".join(map(str, spec.external_ips))
    return ClusterService(cluster=local.cluster, namespace=svc.metadata.namespace, name=svc.metadata.name,
                          frontends=frontends, backends=backends, labels=labels,
                          selector=dict(spec.selector), cluster_id=local.cluster_id)


def eligible_services(published: Iterable[ClusterService], local_manifests: Iterable[Service],
                      local: LocalNode, endpoints: Iterable[Endpoint]) -> list[ClusterService]:
    """Every Service of this node's cluster: from its manifests, global or not (as Cilium's
    BGP control plane does), and any the mesh publishes that no manifest here covers."""
    eps = list(endpoints)
    out = {s.key: s for s in published if s.cluster == local.cluster}
    out.update({(local.cluster, m.metadata.namespace, m.metadata.name): local_service(m, local, eps)
                for m in local_manifests})
    return [out[k] for k in sorted(out)]


class Problem(ValueError):
    """A manifest field that keeps one instance or peer out, phrased for the user."""


@dataclass(frozen=True)
class Inputs:
    """What resolve reads, for the local node: its cluster's manifests by kind, its services."""

    local: LocalNode
    node_ip: IPAddress
    labels: dict[str, str]
    clusters: list[BGPClusterConfig]
    peer_configs: dict[str, BGPPeerConfig]
    adverts: list[BGPAdvertisement]
    overrides: list[BGPNodeConfigOverride]
    services: list[ClusterService]
    secrets_dir: Path
    # what each Service advertisement selects, by id() of the advertisement, filled as read
    service_prefixes: dict[int, list[IPNetwork]] = field(default_factory=dict)
    host_prefixes: list[IPNetwork] = field(default_factory=list)  # what features want announced
    # how many extra times our AS goes into the path of a host prefix, on eBGP
    prepends: dict[IPNetwork, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Identity:
    """This node's side of one BGP instance, after the node's overrides."""

    local_asn: int
    router_id: ipaddress.IPv4Address
    local_address: IPAddress | None
    next_hops: dict[int, IPAddress] = field(default_factory=dict)  # IP version -> address


def resolve(cache: ManifestCache, local: LocalNode, services: Iterable[ClusterService],
            secrets_dir: Path, host_prefixes: Iterable[str] = (),
            prepends: Mapping[str, int] | None = None) -> Resolved:
    problems = {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in cache.problems.items() if k[0] == local.cluster}
    mine = [(k, v) for k, v in cache.good.items() if k[0] == local.cluster]
    inputs = Inputs(
        local=local, node_ip=ipaddress.ip_address(local.ip),
        labels={**local.labels, "kubernetes.io/hostname": local.name, "plexus.io/node": local.name},
        clusters=[v for _, v in sorted(mine, key=lambda kv: kv[0]) if isinstance(v, BGPClusterConfig)],
        peer_configs={v.metadata.name: v for _, v in mine if isinstance(v, BGPPeerConfig)},
        adverts=[v for _, v in mine if isinstance(v, BGPAdvertisement)],
        overrides=[v for _, v in mine
                   if isinstance(v, BGPNodeConfigOverride) and v.metadata.name == local.name],
        services=list(services), secrets_dir=secrets_dir,
        host_prefixes=sorted({ipaddress.ip_network(p) for p in host_prefixes},
                             key=lambda n: (n.version, n)),
        prepends={ipaddress.ip_network(p): n for p, n in (prepends or {}).items() if n > 0})
    out = Resolved({}, {}, problems)
    for cc in inputs.clusters:
        if cc.spec.node_selector is not None and not cc.spec.node_selector.matches(inputs.labels):
            continue
        where = f"BGPClusterConfig/{cc.metadata.namespace}/{cc.metadata.name}"
        for i, inst in enumerate(cc.spec.bgp_instances):
            try:
                identity = instance_identity(inst, i, inputs)
            except Problem as e:
                problems[where] = str(e)
                continue
            for j, peer in enumerate(inst.peers):
                try:
                    add_peer(out, inputs, inst.name, identity, peer, f"spec.bgpInstances[{i}].peers[{j}]",
                             f"{where}/{peer.name}")
                except Problem as e:
                    problems[f"{where}/{peer.name}"] = str(e)
    return out


def instance_identity(inst: Instance, i: int, inputs: Inputs) -> Identity:
    """ASN, router ID and local address of an instance: the node's override wins."""
    local_asn, router_id, local_addr = inst.local_asn, inst.router_id, None
    next_hops: dict[int, IPAddress] = {inputs.node_ip.version: inputs.node_ip}
    for ov in inputs.overrides:
        for io in ov.spec.bgp_instances:
            if io.name == inst.name:
                local_asn = io.local_asn or local_asn
                router_id = io.router_id or router_id
                local_addr = io.local_address or local_addr
                for nh in (io.ipv4_next_hop, io.ipv6_next_hop):
                    if nh is not None:
                        next_hops[nh.version] = nh
    if router_id is None:
        if not isinstance(inputs.node_ip, ipaddress.IPv4Address):
            raise Problem(f"spec.bgpInstances[{i}].routerID: required on an IPv6-only node")
        router_id = inputs.node_ip
    return Identity(local_asn, router_id, local_addr, next_hops)


def peer_config_of(peer: ClusterPeer, inputs: Inputs, field_: str) -> PeerConfigSpec:
    """The BGPPeerConfig a peer names, or the defaults when it names none."""
    if peer.peer_config_ref is None:
        return PeerConfigSpec()
    pc = inputs.peer_configs.get(peer.peer_config_ref.name)
    if pc is None:
        raise Problem(f"{field_}.peerConfigRef.name: no BGPPeerConfig {peer.peer_config_ref.name!r}")
    return pc.spec


def add_peer(out: Resolved, inputs: Inputs, instance: str, identity: Identity, peer: ClusterPeer,
             field_: str, where: str = "") -> None:
    """One peer of an instance: its session settings and the routes it is sent. Routes of
    the other family than the session's need this node's address of their family as next
    hop; without one they are left out and the peer's problem says so."""
    spec = peer_config_of(peer, inputs, field_)
    try:
        password = read_password(spec, inputs.secrets_dir)
    except ValueError as e:
        raise Problem(f"{field_}: {e}") from None
    src = identity.local_address or inputs.node_ip
    if src.version != peer.peer_address.version:
        raise Problem(f"{field_}.peerAddress: IPv{peer.peer_address.version} peer but local "
                      f"address {src} is IPv{src.version}")
    if peer.peer_address in out.neighbors:
        raise Problem(f"{field_}.peerAddress: {peer.peer_address} is configured twice")
    gr = spec.graceful_restart
    out.neighbors[peer.peer_address] = Neighbor(
        peer_address=peer.peer_address, peer_asn=peer.peer_asn, local_asn=identity.local_asn,
        router_id=identity.router_id, local_address=src, instance=instance, name=peer.name,
        port=spec.transport.peer_port, hold_time=spec.timers.hold_time_seconds,
        keepalive=spec.timers.keep_alive_time_seconds,
        connect_retry=spec.timers.connect_retry_time_seconds,
        multihop=spec.ebgp_multihop, password=password,
        graceful_restart=gr.restart_time_seconds if gr.enabled else None,
        families=tuple(sorted({f.afi for f in spec.families})))
    routes = wanted_routes(spec, inputs, src.version, identity.next_hops)
    if peer.peer_asn != identity.local_asn:  # on iBGP our own AS in the path would be a loop
        for net, times in inputs.prepends.items():
            if net in routes:
                routes[net] = replace(routes[net], as_path=(identity.local_asn,) * (1 + times))
    out.routes[peer.peer_address] = routes
    left_out = {v for f in spec.families if f.advertisements is not None
                and (v := 4 if f.afi == "ipv4" else 6) != src.version and v not in identity.next_hops}
    missing = sorted({n.version for n in wanted_routes(spec, inputs) if n.version in left_out}
                     if left_out else set())
    for v in missing:
        out.problems[f"{where or field_}/ipv{v}"] = (
            f"{field_}: IPv{v} routes over an IPv{src.version} session need this node's IPv{v} "
            f"address as next hop: set ipv{v}NextHop for instance {instance!r} in the node's "
            "BGPNodeConfigOverride (they are not announced meanwhile)")


def wanted_routes(spec: PeerConfigSpec, inputs: Inputs, session_version: int = 0,
                  next_hops: dict[int, IPAddress] | None = None) -> dict[IPNetwork, RouteAttrs]:
    """Every prefix the peer's families select, attributes merged where advertisements overlap.

    With a session_version, prefixes of the other family carry the next hop of their family
    from `next_hops` (and are left out without one)."""
    wanted: dict[IPNetwork, RouteAttrs] = {}
    for fam in spec.families:
        if fam.advertisements is None:
            continue
        version = 4 if fam.afi == "ipv4" else 6
        next_hop = None
        if session_version and version != session_version:
            next_hop = (next_hops or {}).get(version)
            if next_hop is None:
                continue
        for ad in inputs.adverts:
            if not fam.advertisements.matches(ad.metadata.labels):
                continue
            for item in ad.spec.advertisements:
                attrs = replace(attrs_of(item), next_hop=next_hop)
                for net in advertised_prefixes(item, version, inputs):
                    if net.version != version:
                        continue
                    old = wanted.get(net)
                    wanted[net] = attrs if old is None else old.merge(attrs)
    return wanted


def advertised_prefixes(item: Advertisement, version: int, inputs: Inputs) -> list[IPNetwork]:
    if item.advertisement_type == "PodCIDR":
        cidr = inputs.local.pod_cidr if version == 4 else inputs.local.pod_cidr_v6
        return [ipaddress.ip_network(cidr)] if cidr else []
    if item.advertisement_type == "EgressGateway":
        return inputs.host_prefixes
    # the same for every family and peer: walked once per resolve
    known = inputs.service_prefixes.get(id(item))
    if known is None:
        known = inputs.service_prefixes[id(item)] = service_prefixes(item, inputs.services, inputs.local)
    return known

"""Egress gateway: pods selected by EgressGatewayPolicies of every cluster leave through
gateway nodes with a fixed egress IP, failing over to the next gateway in the policy's list.

Inputs: the manifests of every cluster (MANIFESTS), the mesh's nodes, ipcache and identities,
and the gateway health table this module provides (GATEWAY_HEALTH), which probers and the
control plane write. Outputs: the policies, active gateways and datapath entries tables
(EGRESS_ENTRIES, provided for the datapath), `GET /v1/egress/list` and metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from bpf.egress import EgressMaps, SnatEntry, SteeringEntry
from bpf.flows import EGRESS_POLICY_OF
from bpf.module import DATAPATH
from clustermesh.models import Identity, IPIdentity, Node, NodeAddress
from clustermesh.tables import IDENTITIES, IPCACHE, NODES
from egress.claims import SegmentClaims
from egress.config import EgressConfig
from egress.failover import GatewayChooser, healthy
from egress.metrics import EgressMetrics, SnatConnections
from egress.models import MANIFEST_KINDS, EgressGatewayPolicy
from egress.ops import (
    ADDRESS_PROTOCOL,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    ClaimOps,
    SnatOps,
    SteeringOps,
    Tunnel,
    TunnelOps,
    ethernet_addresses,
    interface_addresses,
    uplink_of,
)
from egress.probe import GatewayProber
from egress.tables import (
    ANNOTATION_INTERFACES,
    ANNOTATION_PROBES,
    ANNOTATION_UNAVAILABLE,
    BY_SOURCE,
    EGRESS_ENTRIES,
    GATEWAY_HEALTH,
    ActiveGateway,
    ActiveKey,
    EgressEntry,
    GatewayHealth,
    Gateways,
    MeshEndpoint,
    MeshIndex,
    PolicyKey,
    PolicyState,
    active_table,
    entries,
    entries_table,
    format_interfaces,
    format_verdicts,
    health_table,
    mesh_health,
    node_labels,
    node_name,
    policies_table,
    policy_name,
    reporter_of,
    resolve_gateways,
    resolve_policy,
    selects,
)
from plexus.core.kernel import kernel_numbers
from plexus.core.manifests import MANIFESTS, ManifestCache
from plexus.core.module import Hive, Module
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES
from plexus.core.prefixes import HostPrefix, host_prefixes
from plexus.core.tables import Table
from plexus.core.tunnels import NodeTunnel, node_tunnels

log = logging.getLogger(__name__)
# AS paths longer than this are filtered by some routers; gateways past it tie
MAX_PREPEND = 8


class EgressGateways:
    def __init__(self, hive: Hive, config: EgressConfig) -> None:
        self.hive = hive
        self.config = config
        self.local = hive.require(LOCAL_NODE)
        self.manifests = hive.require(MANIFESTS)
        self.nodes: Table[Any, Node] | None = hive.optional(NODES)
        self.ipcache: Table[Any, IPIdentity] | None = hive.optional(IPCACHE)
        self.identities: Table[int, Identity] | None = hive.optional(IDENTITIES)
        self.health = hive.provide(GATEWAY_HEALTH, health_table())
        self.mesh = MeshIndex(self.ipcache, self.identities, self.nodes)
        # what the nodes decide, kept while they are unchanged (Table.revision)
        self._nodes_seen = -1
        self._gateways: dict[PolicyKey, tuple[EgressGatewayPolicy, Gateways]] = {}
        self._mesh_health_of: frozenset[tuple[str, str]] | None = None
        self._last_inputs: tuple[Any, ...] | None = None
        self.attributes = hive.optional(NODE_ATTRIBUTES)  # what this node tells the mesh
        self.mesh_health: list[GatewayHealth] = []  # what other nodes' records say
        # interfaces policies name for this node as a gateway, and their IPv4 address here
        self.named_interfaces: frozenset[str] = frozenset()
        self.interface_ips: dict[str, str | None] = {}
        self._interfaces_wanted = asyncio.Event()
        self.entries = hive.provide(EGRESS_ENTRIES, entries_table())
        self.policies = policies_table()
        self.active = active_table()
        self.cache = ManifestCache(MANIFEST_KINDS, log)
        self.chooser = GatewayChooser(hive.clock, config.hold_down)
        self.own_chooser = GatewayChooser(hive.clock, config.hold_down)  # this node as a source
        self._here = MeshEndpoint("", self.local.cluster, "", "", {}, {},
                                  (self.local.cluster, self.local.name))
        self.metrics = EgressMetrics(hive.metrics.registry)
        self.maps: EgressMaps | None = None  # once the datapath is loaded
        hive.metrics.registry.register(SnatConnections(
            lambda: [c.egress_ip for c in self.maps.connections()] if self.maps else []))
        self._created: dict[PolicyKey, float] = {}
        self._failovers_counted: dict[ActiveKey, int] = {}
        self._dirty = asyncio.Event()
        # the datapath's rows: steering of local pods, translation when this node is a gateway
        self.datapath = hive.optional(DATAPATH)
        self.announced = host_prefixes(hive)  # the egress IPs this node holds as active gateway
        self.node_tunnels = node_tunnels(hive)  # encryption, when on, carries the VXLAN inside
        self.steering: Table[tuple[str, str], SteeringEntry] = Table("egress-steering",
                                                                      key=lambda e: e.key)
        self.snat: Table[tuple[str, str], SnatEntry] = Table("egress-snat", key=lambda e: e.key)
        self.tunnel: Table[str, Tunnel] = Table("egress-tunnel", key=lambda t: t.key)
        self.segment = SegmentClaims(ethernet_addresses)  # egress IPs on this node's segments
        if config.enabled and config.datapath and self.datapath and self.datapath.config.enabled:
            kernel_numbers(hive).claim("address-protocol", ADDRESS_PROTOCOL, "egress",
                                       "marks the egress IPs it claims on a segment")
        # pinned entries stay until the sources are synced: a restart must not drop them
        self._gates = [t.register_initializer("sources")
                       for t in (self.steering, self.snat, self.segment.table)]
        me = (self.local.cluster, self.local.name)
        self.prober = GatewayProber(reporter_of(me), self.health, hive.clock, self.probe_targets,
                                    config.probe_interval, config.probe_threshold)
        hive.routes.get("/v1/egress/list", self._list)
        hive.provide(EGRESS_POLICY_OF, self.policy_of)

    # ---- lifecycle ------------------------------------------------------------------
    def _annotate(self, name: str, value: str | None) -> None:
        if self.attributes is not None:
            self.attributes.annotate(name, value)

    async def start(self) -> None:
        if not self.config.enabled:
            self._annotate(ANNOTATION_UNAVAILABLE, "the egress module is off on this node")
            return
        self.recompute()
        for table in (self.manifests, self.nodes, self.ipcache, self.identities, self.health):
            if table is not None:
                self.hive.spawn("egress", self._follow(table), table.name)
        self.hive.spawn("egress", self._recompute_loop(), "recompute")
        if self.config.datapath and self.datapath is not None and self.datapath.config.enabled:
            self.node_tunnels.upsert(NodeTunnel(VXLAN_PORT, "egress", "VXLAN to egress gateways",
                                                VXLAN_OVERHEAD))
            self.hive.spawn("egress", self._datapath(), "datapath")
            self.hive.spawn("egress", self._open_gates(), "gates")
            if self.config.probe:  # a node without the datapath steers nothing: no probes
                self.hive.spawn("egress", self.prober.run(), "probe")
            self.hive.spawn("egress", self._follow_interfaces(), "interfaces")
        else:
            self._annotate(ANNOTATION_UNAVAILABLE, "the egress datapath is off on this node")

    async def _datapath(self) -> None:
        """Once the bpf module has loaded the program: the tunnel, the NAT, the maps."""
        assert self.datapath is not None
        await self.datapath.loaded.wait()
        dp = self.datapath.dp
        assert dp is not None
        maps = self.maps = EgressMaps(dp.bpf)
        uplink = self.config.uplink or await asyncio.to_thread(uplink_of, self.local.ip)
        if uplink is None:
            self.hive.health["egress"] = (f"no interface holds the node IP {self.local.ip}: "
                                          "set egress.uplink")
            log.error("%s", self.hive.health["egress"])
            self._annotate(ANNOTATION_UNAVAILABLE, self.hive.health["egress"])
            return
        self._annotate(ANNOTATION_UNAVAILABLE, None)
        self.tunnel.upsert(Tunnel(self.config.tunnel_device, uplink))
        self.hive.reconcile("egress", "egress-tunnel", self.tunnel,
                            TunnelOps(maps, dp.egress_nat_out, dp.egress_nat_in,
                                      dp.egress_tunnel_in))
        self.hive.reconcile("egress", "egress-steering", self.steering, SteeringOps(maps))
        self.hive.reconcile("egress", "egress-snat", self.snat, SnatOps(maps))
        self.hive.reconcile("egress", "egress-arp-claims", self.segment.table, ClaimOps())
        self.hive.spawn("egress", self.segment.follow(self.hive.clock, self._dirty),
                        "interface-addresses")
        self.hive.spawn("egress", self._sweep(maps), "nat-sweep")

    async def _sweep(self, maps: EgressMaps) -> None:
        while True:
            await asyncio.sleep(self.config.nat_sweep_interval)
            gone = await asyncio.to_thread(maps.expire)
            if gone:
                self.metrics.snat_expired.inc(gone)
                log.debug("egress: %d expired translations swept", gone)

    async def _open_gates(self) -> None:
        for t in (self.manifests, self.nodes, self.ipcache, self.identities):
            if t is not None:
                await t.initialized.wait()
        self.recompute()
        for done in self._gates:
            done()
        self._gates = []

    async def stop(self) -> None:
        await self.hive.cancel_tasks("egress")  # stop is not remove: entries stay as they are

    async def _follow_interfaces(self, every: float = 2.0) -> None:
        """The address of each interface policies name for this node (Cilium's `interface`
        form), looked up again every `every` seconds and when the names change."""
        while True:
            names = self.named_interfaces
            found = await asyncio.to_thread(interface_addresses, names) if names else {}
            if found != self.interface_ips:
                self.interface_ips = found
                self._dirty.set()
            self._interfaces_wanted.clear()
            try:
                await asyncio.wait_for(self._interfaces_wanted.wait(), every)
            except TimeoutError:
                pass

    async def _follow(self, table: Table[Any, Any]) -> None:
        async for _ in table.watch():  # the first batch (replay) closes the gap since start
            self._dirty.set()

    async def _recompute_loop(self) -> None:
        while True:
            # A gateway in hold-down takes over when it ends, with no other change needed.
            due = [d for d in (self.chooser.next_deadline(), self.own_chooser.next_deadline()) if d]
            await self.hive.clock.wait_until(min(due) if due else None, self._dirty)
            self._dirty.clear()
            self.recompute()

    def _node_ip(self, key: tuple[str, str]) -> str | None:
        node = self.nodes.get(key) if self.nodes is not None else None
        return node.internal_ip() if node is not None else None

    def probe_targets(self) -> dict[tuple[str, str], str]:
        """The gateway nodes (and their IPs) of every policy selecting a pod on this node, and
        on a gateway those before it in its policies' lists."""
        me = (self.local.cluster, self.local.name)
        ips = {n.key: n.internal_ip() for n in self.nodes or []}
        out = {}
        for p in self.policies:
            nodes = [gw.node for gw in p.gateways]
            if any(e.node == me for e in p.endpoints):
                wanted = nodes
            else:  # a gateway: those before it, to know when it is the active one
                wanted = nodes[:nodes.index(me)] if me in nodes else []
            for node in wanted:
                ip = ips.get(node)
                if node != me and ip:
                    out[node] = ip
        return out

    # ---- derivation -----------------------------------------------------------------
    def recompute(self) -> None:
        self.cache.sync(m for m in self.manifests if m.kind in MANIFEST_KINDS)
        now = self.hive.clock.time()
        parsed = {(k[0], k[2], k[3]): p for k, p in self.cache.parsed(EgressGatewayPolicy).items()}
        for key, p in parsed.items():
            # Age: when it was first stored (plexus apply stamps it), else when first seen here.
            created = p.metadata.creation_timestamp
            self._created[key] = created.timestamp() if created else self._created.get(key, now)
        for key in self._created.keys() - parsed.keys():
            del self._created[key]
        # Every node and endpoint of the mesh, only when a policy may select some: with
        # hundreds of clusters the scans would otherwise run on each batch of changes for nothing.
        if parsed:
            touched = self.mesh.refresh()  # only the endpoints that changed are read again
            if touched is not None and self._inputs() == self._last_inputs and not any(
                    selects(p, e) for e in touched for p in parsed.values()):
                return  # only pods no policy selects changed: nothing derived can change
        else:
            self.mesh.forget()
            self._last_inputs = None
        nodes_seen = self.nodes.revision if self.nodes is not None else 0
        if nodes_seen != self._nodes_seen:  # nodes change rarely: what they decide is kept
            self._nodes_seen, self._gateways, self._mesh_health_of = nodes_seen, {}, None
        states = [resolve_policy(k, self._created[k], p, self.mesh, (),
                                 self._gateways_of(k, p)) for k, p in parsed.items()]
        me = (self.local.cluster, self.local.name)
        gateway_nodes = frozenset(gw.node for s in states for gw in s.gateways)
        if self._mesh_health_of != gateway_nodes:
            self.mesh_health = mesh_health(self.nodes or [], set(gateway_nodes), me) \
                if gateway_nodes else []
            self._mesh_health_of = gateway_nodes
        own = dict(self.health.items())
        health = {**{h.key: h for h in self.mesh_health}, **own}  # this node's probes are fresher
        self._tell_mesh(own, parsed.values())
        active = self.chooser.choose(states, health)
        self.chooser.forget((src, gw.node) for p in states for src in {e.node for e in p.endpoints}
                            for gw in p.gateways)
        derived = entries(states, active)
        states = [replace(s, conflicts=tuple(derived.conflicts.get(s.key, ()))) for s in states]
        self.policies.replace_where(lambda _p: True, states)
        self.active.replace_where(lambda _a: True, active.values())
        self.entries.replace_where(lambda _e: True, derived.entries)
        # an interface's address as found here; none: the gateway drops, never leaks
        my_egress = {p.key: (self.interface_ips.get(gw.interface) if gw.interface else gw.egress_ip)
                     for p in states for gw in p.gateways if gw.node == me}
        steering, snat = datapath_rows(derived.entries, me, self._node_ip, my_egress)
        self.steering.replace_where(lambda _e: True, steering)
        self.snat.replace_where(lambda _e: True, snat)
        # as the gateway sees it: active when every gateway before it in the list is down
        own_view = self.own_chooser.choose(
            [replace(p, endpoints=(self._here,)) for p in states if p.key in my_egress], health)
        held = held_egress_ips(own_view.values(), me, self.local.ip,
                               {p.key: [gw.node for gw in p.gateways] for p in states})
        self.announced.replace_where(lambda p: p.owner == "egress", held)
        self.segment.derive(held, self.local.ip)  # and on its own segment: gratuitous ARP
        self._update_metrics(states, health)
        if parsed:  # as the choice leaves them: a hold-down running now makes the next differ
            self._last_inputs = self._inputs()

    def _inputs(self) -> tuple[Any, ...]:
        """All a recompute reads but the endpoints, as cheap to compare: the same tuple twice
        (and no hold-down running, whose end changes the choice) means the same inputs."""
        rev = [t.revision if t is not None else 0 for t in (self.nodes, self.identities)]
        pending = self.chooser.next_deadline() or self.own_chooser.next_deadline()
        return (self.cache.generation, *rev, self.health.revision,
                tuple(sorted(self.interface_ips.items())), self.segment.addresses,
                pending if pending is None else self.hive.clock.now())

    def _gateways_of(self, key: PolicyKey, policy: EgressGatewayPolicy) -> Gateways:
        """A policy's gateways, derived again only when it or the nodes changed."""
        known = self._gateways.get(key)
        if known is None or known[0] is not policy:
            known = self._gateways[key] = (policy, resolve_gateways(policy, self.nodes or []))
        return known[1]

    def _tell_mesh(self, own: Mapping[Any, GatewayHealth],
                   policies: Iterable[EgressGatewayPolicy]) -> None:
        """Onto this node's record: what its probes find (so every node shows which gateway
        each source uses), and the addresses of the interfaces policies name for it."""
        me = (self.local.cluster, self.local.name)
        mine = reporter_of(me)
        verdicts = {gw: h.healthy for (r, gw), h in own.items() if r == mine}
        self._annotate(ANNOTATION_PROBES, format_verdicts(verdicts) or None)
        named = [gw for p in policies for gw in p.spec.egress_gateways if gw.interface]
        names: frozenset[str] = frozenset()
        if named:
            record = (self.nodes.get(me) if self.nodes is not None else None) or Node(
                self.local.name, self.local.cluster, self.local.cluster_id,
                (NodeAddress("InternalIP", self.local.ip),), labels=dict(self.local.labels))
            labels = node_labels(record)
            names = frozenset(gw.interface for gw in named
                              if gw.interface and gw.node_selector.matches(labels))
        if names != self.named_interfaces:
            self.named_interfaces = names
            self._interfaces_wanted.set()
        known = {n: self.interface_ips[n] for n in names if n in self.interface_ips}
        self._annotate(ANNOTATION_INTERFACES, format_interfaces(known) or None)

    def _update_metrics(self, states: list[PolicyState], health: dict[Any, Any]) -> None:
        me = (self.local.cluster, self.local.name)
        self.metrics.gateway_healthy.clear()
        for s in states:
            for gw in s.gateways:
                self.metrics.gateway_healthy.labels(policy_name(s.key), node_name(gw.node)).set(
                    1 if healthy(health, me, gw.node) else 0)
        for key, total in self.chooser.failovers.items():
            new = total - self._failovers_counted.get(key, 0)
            if new > 0:
                self.metrics.failovers.labels(policy_name(key[0]), node_name(key[1])).inc(new)
            self._failovers_counted[key] = total

    # ---- status and API -------------------------------------------------------------
    def policy_of(self, source: str, destination: str) -> str:
        """The policy whose entry a packet from `source` to `destination` meets (the most
        specific destination, as the datapath's LPM), for flows; "" when none."""
        try:
            dst = ipaddress.ip_address(destination)
        except ValueError:
            return ""
        best: EgressEntry | None = None
        best_len = -1
        for e in self.entries.by(BY_SOURCE, source):
            net = ipaddress.ip_network(e.destination)
            if dst.version == net.version and dst in net and net.prefixlen > best_len:
                best, best_len = e, net.prefixlen
        return policy_name(best.policy) if best is not None and not best.excluded else ""

    def listing(self) -> dict[str, Any]:
        me = (self.local.cluster, self.local.name)
        own = dict(self.health.items())
        health = {**{h.key: h for h in self.mesh_health}, **own}
        reporters = {r for r, _gw in health}
        out = []
        for s in sorted(self.policies, key=lambda p: p.key):
            active = sorted((a for a in self.active if a.policy == s.key),
                            key=lambda a: node_name(a.source))
            out.append({
                "name": policy_name(s.key), "cluster": s.key[0], "namespace": s.key[1],
                "policy": s.key[2], "destinationCIDRs": list(s.destinations),
                "excludedCIDRs": list(s.excluded),
                "gateways": [{"node": node_name(g.node), "entry": g.entry, "egressIP": g.egress_ip,
                              "interface": g.interface, "healthy": healthy(health, me, g.node)}
                             for g in s.gateways],
                "endpoints": [{"ip": e.ip, "cluster": e.cluster, "namespace": e.namespace,
                               "pod": e.pod, "node": node_name(e.node)} for e in s.endpoints],
                "active": [_active(a, "this node's probes" if a.source == me else
                                   "its node's probes" if a.source and reporter_of(a.source)
                                   in reporters else "the control plane") for a in active],
                "problems": list(s.problems), "conflicts": list(s.conflicts)})
        return {
            "node": node_name(me), "holdDown": self.config.hold_down, "policies": out,
            "rejected": {"/".join(k): p for k, p in sorted(self.cache.problems.items())},
            "datapath": {"loaded": self.maps is not None, "steering": len(self.steering),
                         "snat": len(self.snat),
                         "announced": sorted(p.prefix for p in self.announced
                                             if p.owner == "egress"),
                         "arp": self.segment.listing()},
            "health": [{"reporter": h.reporter, "gateway": node_name(h.gateway),
                        "healthy": h.healthy, "reason": h.reason}
                       for h in sorted(health.values(), key=lambda h: h.key)],
        }

    async def _list(self, _q: dict[str, str], _b: Any) -> Any:
        return self.listing()

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"enabled": False}
        return {"policies": len(self.policies), "entries": len(self.entries),
                "rejected": {"/".join(k): p for k, p in sorted(self.cache.problems.items())},
                "problems": {policy_name(s.key): list(s.problems) for s in self.policies
                             if s.problems}}


def datapath_rows(entries: list[EgressEntry], me: tuple[str, str],
                  node_ip: Callable[[tuple[str, str]], str | None],
                  my_egress: Mapping[PolicyKey, str | None]
                  ) -> tuple[list[SteeringEntry], list[SnatEntry]]:
    """This node's share of the entries (IPv4): steering of its own pods (a pod whose gateway
    is this node leaves as before and is translated on the uplink), and translation of every
    source of the policies this node is a gateway of (`my_egress`: policy -> the egress IP it
    leaves with here), active or standby, so a failover finds it ready; an excluded
    destination of those sources stays untranslated."""
    steering: list[SteeringEntry] = []
    snat: list[SnatEntry] = []
    mine = {e.source_ip for e in entries if not e.excluded and e.policy in my_egress}
    for e in entries:
        if ":" in e.source_ip:
            continue  # the egress datapath is IPv4 only
        if e.source_node == me:
            if e.excluded or e.gateway == me:
                steering.append(SteeringEntry(e.source_ip, e.destination, excluded=True))
            else:
                gateway = node_ip(e.gateway) if e.gateway else None
                steering.append(SteeringEntry(e.source_ip, e.destination, gateway))
        if e.source_ip in mine:
            # replies go back through the tunnel to the pod's node, unless it is this one
            via = node_ip(e.source_node) if e.source_node and e.source_node != me else None
            if e.excluded:
                snat.append(SnatEntry(e.source_ip, e.destination, None, excluded=True))
            elif e.policy in my_egress:
                snat.append(SnatEntry(e.source_ip, e.destination, my_egress[e.policy],
                                      source_node=via))
    return steering, snat


def held_egress_ips(active: Iterable[ActiveGateway], me: tuple[str, str], node_ip: str,
                    order: Mapping[PolicyKey, Sequence[tuple[str, str]]] | None = None
                    ) -> list[HostPrefix]:
    """The egress IPs this node is the active gateway for (of any source node): announced as
    host routes, so the egress IP follows the active gateway; withdrawn when it stops. The
    node's own address (Cilium's form, no egressIP) is routed already.

    Each gateway puts our AS once more into the path for every gateway after it in the
    policy's `order`, so the later a gateway comes, the shorter its path: a router that
    still keeps a dead, more preferred gateway's route (until its hold timer, or its
    graceful-restart time when the session closed) prefers the standby's at once, and
    during a hold-down, when both announce, it prefers the one sources still use."""
    out: dict[str, HostPrefix] = {}
    for a in sorted(active, key=lambda a: (a.policy, a.source or ("", ""))):
        gw = a.gateway
        if gw is None or gw.node != me or not gw.egress_ip or gw.egress_ip == node_ip or gw.interface:
            continue  # the node's own addresses are routed already
        prefix = f"{gw.egress_ip}/{128 if ':' in gw.egress_ip else 32}"
        nodes = list((order or {}).get(a.policy, ()))
        after = len(nodes) - 1 - nodes.index(me) if me in nodes else 0
        prepend = min(MAX_PREPEND, after)
        held = out.get(prefix)
        if held is None or held.as_path_prepend < prepend:
            out[prefix] = HostPrefix(prefix, "egress", held.what if held else
                                     f"egress IP of {policy_name(a.policy)}", prepend)
    return list(out.values())


def _active(a: ActiveGateway, judged_by: str) -> dict[str, Any]:
    gw = a.gateway
    return {"sourceNode": node_name(a.source), "gateway": node_name(gw.node) if gw else None,
            "egressIP": gw.egress_ip if gw else None, "interface": gw.interface if gw else None,
            "healthFrom": judged_by}


module = Module(name="egress", doc=__doc__ or "", config=EgressConfig,
                build=lambda hive, cfg: EgressGateways(hive, cfg))

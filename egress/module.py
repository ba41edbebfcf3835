"""Egress gateway: pods selected by EgressGatewayPolicies of every cluster leave through
gateway nodes with a fixed egress IP, failing over to the next gateway in the policy's list.

Inputs: the manifests of every cluster (MANIFESTS), the mesh's nodes, ipcache and identities,
and the gateway health table this module provides (GATEWAY_HEALTH), which probers and the
control plane write. Outputs: the policies, active gateways and datapath entries tables
(EGRESS_ENTRIES, provided for the datapath), `GET /v1/egress/list` and metrics.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from clustermesh.models import Identity, IPIdentity, Node
from clustermesh.tables import IDENTITIES, IPCACHE, NODES
from egress.config import EgressConfig
from egress.failover import GatewayChooser, healthy
from egress.metrics import EgressMetrics
from egress.models import MANIFEST_KINDS, EgressGatewayPolicy
from egress.tables import (
    EGRESS_ENTRIES,
    GATEWAY_HEALTH,
    ActiveGateway,
    ActiveKey,
    PolicyKey,
    PolicyState,
    active_table,
    entries,
    entries_table,
    health_table,
    mesh_endpoints,
    node_name,
    policies_table,
    policy_name,
    resolve_policy,
)
from plexus.core.manifests import MANIFESTS, ManifestCache
from plexus.core.module import Hive, Module
from plexus.core.node import LOCAL_NODE
from plexus.core.tables import Table

log = logging.getLogger(__name__)


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
        self.entries = hive.provide(EGRESS_ENTRIES, entries_table())
        self.policies = policies_table()
        self.active = active_table()
        self.cache = ManifestCache(MANIFEST_KINDS, log)
        self.chooser = GatewayChooser(hive.clock, config.hold_down)
        self.metrics = EgressMetrics(hive.metrics.registry)
        self._created: dict[PolicyKey, float] = {}
        self._failovers_counted: dict[ActiveKey, int] = {}
        self._dirty = asyncio.Event()
        hive.routes.get("/v1/egress/list", self._list)

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if not self.config.enabled:
            return
        self.recompute()
        for table in (self.manifests, self.nodes, self.ipcache, self.identities, self.health):
            if table is not None:
                self.hive.spawn("egress", self._follow(table), table.name)
        self.hive.spawn("egress", self._recompute_loop(), "recompute")

    async def stop(self) -> None:
        await self.hive.cancel_tasks("egress")  # stop is not remove: entries stay as they are

    async def _follow(self, table: Table[Any, Any]) -> None:
        async for _ in table.watch():  # the first batch (replay) closes the gap since start
            self._dirty.set()

    async def _recompute_loop(self) -> None:
        while True:
            # A gateway in hold-down takes over when it ends, with no other change needed.
            await self.hive.clock.wait_until(self.chooser.next_deadline(), self._dirty)
            self._dirty.clear()
            self.recompute()

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
        nodes = list(self.nodes or [])
        # Every endpoint of the mesh, only when a policy may select some: with hundreds of
        # clusters the scan would otherwise run on each batch of ipcache changes for nothing.
        endpoints = mesh_endpoints(self.ipcache or [], {i.id: i for i in self.identities or []},
                                   nodes) if parsed else []
        states = [resolve_policy(k, self._created[k], p, endpoints, nodes) for k, p in parsed.items()]
        health = dict(self.health.items())
        active = self.chooser.choose(states, health)
        self.chooser.forget((src, gw.node) for p in states for src in {e.node for e in p.endpoints}
                            for gw in p.gateways)
        derived = entries(states, active)
        states = [replace(s, conflicts=tuple(derived.conflicts.get(s.key, ()))) for s in states]
        self.policies.replace_where(lambda _p: True, states)
        self.active.replace_where(lambda _a: True, active.values())
        self.entries.replace_where(lambda _e: True, derived.entries)
        self._update_metrics(states, health)

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
    def listing(self) -> dict[str, Any]:
        me = (self.local.cluster, self.local.name)
        health = dict(self.health.items())
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
                "active": [_active(a) for a in active],
                "problems": list(s.problems), "conflicts": list(s.conflicts)})
        return {
            "node": node_name(me), "holdDown": self.config.hold_down, "policies": out,
            "rejected": {"/".join(k): p for k, p in sorted(self.cache.problems.items())},
            "health": [{"reporter": h.reporter, "gateway": node_name(h.gateway),
                        "healthy": h.healthy, "reason": h.reason}
                       for h in sorted(self.health, key=lambda h: h.key)],
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


def _active(a: ActiveGateway) -> dict[str, Any]:
    gw = a.gateway
    return {"sourceNode": node_name(a.source), "gateway": node_name(gw.node) if gw else None,
            "egressIP": gw.egress_ip if gw else None, "interface": gw.interface if gw else None}


module = Module(name="egress", doc=__doc__ or "", config=EgressConfig,
                build=lambda hive, cfg: EgressGateways(hive, cfg))

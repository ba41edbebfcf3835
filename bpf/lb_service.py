"""Global service load-balancing in the datapath: frontends -> backends of every cluster.

The merged services of every cluster (`SERVICES`, merged per affinity by ClusterMesh's
`merge`: local prefers this cluster's backends while it has any, remote the others', none
takes all) become two typed tables, frontends and backends (`bpf.lb`). Reconcilers write
them into the pinned maps `lb4_services` and `lb4_backends` (programs/lb.h), one changed
entry at a time; a restarted agent adopts the pinned backend ids and entries, so existing
connections keep their backend and nothing is pruned before the services are synced.
Translations come back through a perf buffer as TRANSLATED flows for `plexus observe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from typing import Any

from bpf.flows import Flow
from bpf.lb import (
    PROTOCOL_NAMES,
    VERDICT_TRANSLATED,
    BackendIds,
    FrontendKey,
    LbBackend,
    LbFrontend,
    LbMaps,
    derive,
)
from bpf.loader import u32_ip
from bpf.ops import LbBackendOps, LbFrontendOps
from clustermesh.models import ID_WORLD
from clustermesh.services import merge
from clustermesh.tables import IPCACHE, NODES, SERVICES
from plexus.core.api import ApiError
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE
from plexus.core.reconciler import Reconciler
from plexus.core.tables import Table


class ServiceLoadBalancer:
    """Part of the bpf module: derives the LB tables, reconciles them, reports translations.

    `enrich` turns a datapath event (the policy flow's shape) into a flow; `publish`
    hands a flow to `plexus observe`.
    """

    def __init__(self, hive: Hive, enrich: Callable[[dict[str, Any]], Flow],
                 publish: Callable[[Flow], None]) -> None:
        self.hive = hive
        self.enrich = enrich
        self.publish = publish
        self.local = hive.require(LOCAL_NODE)
        self.services = hive.require(SERVICES)
        self.nodes = hive.require(NODES)
        self.ipcache = hive.require(IPCACHE)
        self.frontends: Table[FrontendKey, LbFrontend] = Table("bpf-lb-frontends", key=lambda f: f.key)
        self.backends: Table[int, LbBackend] = Table("bpf-lb-backends", key=lambda b: b.key)
        self._gates = [t.register_initializer("services") for t in (self.frontends, self.backends)]
        self.ids = BackendIds()
        self.maps: LbMaps | None = None
        self.reconcilers: list[Reconciler[Any, Any]] = []
        hive.routes.get("/v1/bpf/lb", self._api)

    def start(self, bpf: Any, loop: asyncio.AbstractEventLoop, lost: Callable[[int], None]) -> None:
        """Adopt the pinned backend ids, start the reconcilers, open the flow buffer (before
        the module's poll thread starts)."""
        self.maps = maps = LbMaps(bpf)
        self.ids = BackendIds({(ip, port, proto): bid for bid, (ip, port, proto, _c)
                               in maps.backend_items().items()})
        self.reconcilers = [
            self.hive.reconcile("bpf", "bpf-lb-backends", self.backends, LbBackendOps(maps)),
            self.hive.reconcile("bpf", "bpf-lb-frontends", self.frontends,
                                LbFrontendOps(maps, self.backends)),
        ]
        self.hive.spawn("bpf", self._follow(), "lb-derive")

        def on_event(_cpu: int, data: Any, _size: int) -> None:
            e = maps.flows.event(data)
            ev = {"ts": e.ts, "ifindex": e.ifindex, "client": u32_ip(e.client), "vip": u32_ip(e.vip),
                  "backend": u32_ip(e.backend), "backend_id": e.backend_id,
                  "cport": socket.ntohs(e.cport), "vport": socket.ntohs(e.vport),
                  "bport": socket.ntohs(e.bport), "proto": e.proto, "verdict": e.verdict}
            loop.call_soon_threadsafe(self._publish, ev)

        maps.flows.open_perf_buffer(on_event, page_cnt=16, lost_cb=lost)

    async def _follow(self) -> None:
        await self.services.initialized.wait()
        first = True
        async for _ in self.services.watch():
            self.recompute()
            if first:  # complete before any prune may run: adopted entries stay meanwhile
                first = False
                for done in self._gates:
                    done()

    def cluster_ids(self) -> dict[str, int]:
        out = {s.cluster: s.cluster_id for s in self.services if s.cluster_id}
        out.update({n.cluster: n.cluster_id for n in self.nodes if n.cluster_id})
        out[self.local.cluster] = self.local.cluster_id
        return out

    def recompute(self) -> None:
        merged = merge(self.services.all(), self.local.cluster)
        frontends, backends = derive(merged, self.cluster_ids(), self.ids)
        self.backends.replace_where(lambda _r: True, backends)
        self.frontends.replace_where(lambda _r: True, frontends)

    # ---- flows ----------------------------------------------------------------------
    def _publish(self, ev: dict[str, Any]) -> None:
        translated = ev["verdict"] == VERDICT_TRANSLATED
        peer = ev["backend"] if translated else ev["vip"]
        known = self.ipcache.get(f"{peer}/32")
        flow = self.enrich({"ts": ev["ts"], "ifindex": ev["ifindex"], "src": ev["client"], "dst": peer,
                            "identity": known.identity if known else ID_WORLD, "sport": ev["cport"],
                            "dport": ev["bport"] if translated else ev["vport"],
                            "proto": ev["proto"], "direction": 0, "verdict": 1})
        front = self.frontends.get((ev["vip"], ev["vport"], ev["proto"]))
        self.publish(dataclasses.replace(
            flow, kind="translation", verdict="TRANSLATED" if translated else "DROPPED",
            drop_reason="" if translated else "SERVICE_BACKEND_NOT_FOUND",
            service=front.service if front else ""))

    # ---- API ------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """What the maps hold, with the names the desired rows give them."""
        if self.maps is None:
            raise ApiError(409, "the eBPF datapath is not loaded on this node")
        names = {cid: c for c, cid in self.cluster_ids().items()}
        backends = self.maps.backend_items()
        out = []
        for (vip, port, proto), (affinity, ids) in sorted(self.maps.service_items().items()):
            front = self.frontends.get((vip, port, proto))
            bes = []
            for bid in ids:
                b = backends.get(bid)
                bes.append({"id": bid, "ip": b[0] if b else "", "port": b[1] if b else 0,
                            "cluster": names.get(b[3], str(b[3])) if b else "",
                            "state": "active" if b else "missing"})
            out.append({"frontend": f"{vip}:{port}/{PROTOCOL_NAMES.get(proto, proto)}",
                        "ip": vip, "port": port, "protocol": PROTOCOL_NAMES.get(proto, str(proto)),
                        "service": front.service if front else "", "affinity": affinity,
                        "backends": bes})
        return out

    async def _api(self, _q: dict[str, str], _b: Any) -> Any:
        return self.rows()

    def status(self) -> dict[str, Any]:
        return {"frontends": len(self.frontends), "backends": len(self.backends)}

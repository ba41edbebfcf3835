"""BGP control plane: this node announces its pod CIDR and services to its peers via ExaBGP.

Config comes from BGPClusterConfig/BGPPeerConfig/BGPAdvertisement/BGPNodeConfigOverride
manifests (MANIFESTS table); desired routes per peer are rows of a table reconciled by the
generic reconciler into ExaBGP (bgp/ops.py, bgp/speaker.py). What went out is read from
the speaker's one record of it (bgp/announced.py). Stop leaves routes to graceful restart/hold
time; `plexus bgp drain` withdraws them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bgp.announced import on_the_wire, wire_text
from bgp.config import BGPConfig
from bgp.metrics import BGPMetrics
from bgp.models import MANIFEST_KINDS
from bgp.ops import RoutesOps
from bgp.speaker import Speaker, explain
from bgp.tables import (
    IPAddress,
    IPNetwork,
    PeerRoutes,
    RouteAttrs,
    eligible_services,
    neighbors_table,
    peer_routes_table,
    resolve,
)
from clustermesh.manifests import Service
from clustermesh.tables import SERVICES
from plexus.core.api import ApiError
from plexus.core.manifests import MANIFESTS, ManifestCache
from plexus.core.module import Hive, Module
from plexus.core.node import ENDPOINTS, LOCAL_NODE
from plexus.core.prefixes import host_prefixes
from plexus.core.reconciler import Backoff, Reconciler

log = logging.getLogger(__name__)


class BGPControlPlane:
    def __init__(self, hive: Hive, config: BGPConfig) -> None:
        self.hive = hive
        self.config = config
        self.local = hive.require(LOCAL_NODE)
        self.manifests = hive.require(MANIFESTS)
        self.services = hive.optional(SERVICES)  # what the mesh publishes: global services
        self.endpoints = hive.optional(ENDPOINTS)  # this node's pods, for externalTrafficPolicy Local
        self.host_prefixes = host_prefixes(hive)  # features' host routes (an active egress IP)
        self.table = peer_routes_table()
        self.neighbors = neighbors_table()
        self.cache = ManifestCache(MANIFEST_KINDS, log)
        self.service_cache = ManifestCache({"Service": Service}, log)  # this cluster's, every one
        self.problems: dict[str, str] = {}
        self.run_dir = hive.state_dir / "bgp"
        self.drain_flag = self.run_dir / "drained"
        self.drained = self.drain_flag.exists()
        self.metrics = BGPMetrics(hive.metrics.registry)
        self.speaker = Speaker(
            self.run_dir, list(config.exabgp), reactor_speed=config.reactor_speed, batch=config.batch,
            backoff_max=config.restart_backoff_max, async_limit=config.async_limit,
            desired=self._desired, on_ready=self._on_ready, on_event=self._on_event)
        self.ops = RoutesOps(self.speaker, on_sent=self._on_sent)
        self.reconciler: Reconciler[IPAddress, PeerRoutes]  # registered with the hive on start
        self._dirty = asyncio.Event()
        self._restarts_seen = 0
        hive.routes.get("/v1/bgp/peers", self._peers)
        hive.routes.get("/v1/bgp/routes/advertised", self._advertised)
        hive.routes.post("/v1/bgp/drain", self._drain)
        hive.routes.post("/v1/bgp/undrain", self._undrain)

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if not self.config.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.recompute()
        self.hive.spawn("bgp", self.speaker.run(), "speaker")
        self.reconciler = self.hive.reconcile("bgp", "bgp", self.table, self.ops,
                                              backoff=Backoff(initial=0.05, maximum=5.0), prune_interval=30.0)
        self.hive.spawn("bgp", self._follow(self.manifests), "manifests")
        if self.services is not None:
            self.hive.spawn("bgp", self._follow(self.services), "services")
        if self.endpoints is not None:
            self.hive.spawn("bgp", self._follow(self.endpoints), "endpoints")
        self.hive.spawn("bgp", self._follow(self.host_prefixes), "host-prefixes")
        self.hive.spawn("bgp", self._recompute_loop(), "recompute")

    async def stop(self) -> None:
        # Stop is not remove: no withdraw; ExaBGP dies without NOTIFICATION (graceful restart).
        await self.hive.cancel_tasks("bgp")
        await self.speaker.stop()

    async def _follow(self, table: Any) -> None:
        async for _ in table.watch():
            self._dirty.set()

    async def _recompute_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.recompute()

    def recompute(self) -> None:
        self.cache.sync(m for m in self.manifests
                        if m.kind in MANIFEST_KINDS and m.cluster == self.local.cluster)
        # The clustermesh feature validates Service manifests and reports bad ones.
        self.service_cache.sync(m for m in self.manifests
                                if m.kind == "Service" and m.cluster == self.local.cluster)
        services = eligible_services(self.services or [], self.service_cache.parsed(Service).values(),
                                     self.local, self.endpoints or [])
        res = resolve(self.cache, self.local, services, self.config.secrets_dir,
                      (p.prefix for p in self.host_prefixes),
                      {p.prefix: p.as_path_prepend for p in self.host_prefixes})
        if res.problems != self.problems:
            for where, p in res.problems.items():
                if self.problems.get(where) != p and p not in self.cache.problems.values():
                    log.warning("bgp config problem where=%s: %s", where, p)  # the cache logs its own
        self.problems = res.problems
        self.neighbors.replace_where(lambda _n: True, res.neighbors.values())
        self.speaker.configure({n.key: n for n in self.neighbors})
        rows = [PeerRoutes(p, {} if self.drained else r) for p, r in res.routes.items()]
        self.table.replace_where(lambda _r: True, rows)

    def _desired(self) -> dict[IPAddress, dict[IPNetwork, RouteAttrs]]:
        return {r.peer: r.routes for r in self.table}

    def _on_ready(self) -> None:
        if self.speaker.restarts != self._restarts_seen:
            self._restarts_seen = self.speaker.restarts
            self.metrics.restarts.inc()
        self.reconciler.requeue_all()

    def _on_event(self, state: str, peer: IPAddress, _reason: str) -> None:
        self.metrics.session_up.labels(str(peer)).set(1 if state == "established" else 0)
        if state == "established":
            self.reconciler.requeue_all()  # its End-of-RIB goes out once its routes are queued

    def _on_sent(self, peer: IPAddress, announced: int, withdrawn: int) -> None:
        self.metrics.updates.labels(str(peer), "announce").inc(announced)
        self.metrics.updates.labels(str(peer), "withdraw").inc(withdrawn)
        self.metrics.advertised.labels(str(peer)).set(self.speaker.announced.count(peer))

    # ---- status and API -------------------------------------------------------------
    def peers(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for addr, n in sorted(self.neighbors.items(), key=lambda kv: (kv[0].version, kv[0])):
            st = self.speaker.peers.get(addr)
            up = st is not None and st.state == "established"
            out.append({
                "peer": str(addr), "name": n.name, "instance": n.instance, "peerASN": n.peer_asn,
                "localASN": n.local_asn, "routerID": str(n.router_id), "localAddress": str(n.local_address),
                "state": st.state if st else "idle", "reason": explain(st, n, now) if st else "",
                "uptime": round(now - st.since, 1) if st and st.state == "established" else 0,
                "advertised": self.speaker.announced.count(addr) if up else 0,
                "desired": len(r.routes) if (r := self.table.get(addr)) else 0,
                "md5": n.password is not None, "gracefulRestart": n.graceful_restart,
                "endOfRib": bool(up and st is not None and st.end_of_rib),
                "routesError": self._routes_error(addr),
            })
        return out

    def _routes_error(self, peer: IPAddress) -> str:
        """Why the peer's routes did not all reach ExaBGP ("" when they did); retried."""
        st = self.reconciler.status.get(peer) if hasattr(self, "reconciler") else None
        return st.error if st is not None and st.state == "error" else ""

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"enabled": False}
        return {"peers": {p["peer"]: p["state"] for p in self.peers()}, "drained": self.drained,
                "problems": self.all_problems(), "speaker": {"restarts": self.speaker.restarts,
                                                             "lastExit": self.speaker.last_exit,
                                                             "refused": self.speaker.refused},
                "reconciler": self.reconciler.summary()}

    async def _peers(self, _q: dict[str, str], _b: Any) -> Any:
        return {"peers": self.peers(), "problems": self.all_problems(), "drained": self.drained}

    def all_problems(self) -> dict[str, str]:
        """Manifest problems, and why ExaBGP refused the wanted config if it did."""
        if not self.speaker.refused:
            return self.problems
        return {**self.problems, "ExaBGP": f"refused the new config, kept the running one: "
                                           f"{self.speaker.refused}"}

    def advertised(self, peer: str = "") -> list[dict[str, Any]]:
        """What each peer with an established session was sent, as it went on the wire."""
        out = []
        for addr, net, a in self.speaker.announced.rows():
            n, st = self.neighbors.get(addr), self.speaker.peers.get(addr)
            if n is None or st is None or st.state != "established" or (peer and peer != str(addr)):
                continue
            wire = on_the_wire(n, a)
            out.append({"peer": str(addr), "prefix": str(net), "attributes": wire_text(wire), **wire})
        return out

    async def _advertised(self, q: dict[str, str], _b: Any) -> Any:
        return self.advertised(q.get("peer", ""))

    async def _drain(self, _q: dict[str, str], _b: Any) -> Any:
        if not self.config.enabled:
            raise ApiError(409, "bgp is disabled on this node")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.drain_flag.touch()
        self.drained = True
        self.recompute()
        return {"drained": True}

    async def _undrain(self, _q: dict[str, str], _b: Any) -> Any:
        self.drain_flag.unlink(missing_ok=True)
        self.drained = False
        self.recompute()
        return {"drained": False}


module = Module(name="bgp", doc=__doc__ or "", config=BGPConfig,
                build=lambda hive, cfg: BGPControlPlane(hive, cfg))

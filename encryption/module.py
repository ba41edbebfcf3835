"""Transparent encryption: a WireGuard peer for every remote node of every cluster.

The private key is made on first start and kept 0600 in the state dir; its public half goes
into this node's record, so every agent of every connected cluster sees it. Remote pod
CIDRs route through the device from a table of their own; stale peers go only after the
node table's first full sync; in strict mode a pod CIDR without a peer is dropped rather
than sent in the clear.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from clustermesh.tables import NODES
from encryption.config import WG_OVERHEAD, EncryptionConfig
from encryption.keys import InvalidKey, KeyPair, parse_public_key
from encryption.ops import RTPROT_PLEXUS, Backend, PeerOps, RouteOps, detect
from encryption.tables import EncryptedRoute, Peer, peers_table, routes_table
from plexus.core.api import ApiError
from plexus.core.kernel import kernel_numbers
from plexus.core.module import Hive, Module
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES, POD_MTU, WIREGUARD_PUBLIC_KEY
from plexus.core.reconciler import Reconciler

log = logging.getLogger(__name__)


class Encryption:
    def __init__(self, hive: Hive, config: EncryptionConfig) -> None:
        self.hive = hive
        self.config = config
        self.local = hive.require(LOCAL_NODE)
        self.nodes = hive.require(NODES)
        self.attributes = hive.require(NODE_ATTRIBUTES)
        self.peers = peers_table()
        self.routes = routes_table()
        self.underlay_mtu: int = hive.agent.node.mtu
        self.keys: KeyPair | None = None
        self.backend: Backend | None = None
        self.refused: dict[str, str] = {}
        self.reconcilers: list[Reconciler[Any, Any]] = []
        self._synced_done = [self.peers.register_initializer("nodes"),
                             self.routes.register_initializer("nodes")]
        # The node record waits for the key: a restarted agent that registered without it
        # would make every peer drop this node until the key came back.
        self._attributes_done = (self.attributes.register_initializer("encryption")
                                 if config.enabled else lambda: None)
        if config.enabled:
            numbers = kernel_numbers(hive)
            numbers.claim("route-table", config.table, "encryption", "routes of remote pod CIDRs")
            numbers.claim("rule-priority", config.rule_priority, "encryption", "ip rule to its table")
            numbers.claim("route-protocol", RTPROT_PLEXUS, "encryption", "marks its routes",
                          shared=True)
        hive.routes.get("/v1/encryption/status", self._status_api)
        hive.routes.post("/v1/encryption/rotate-key", self._rotate_api)
        hive.metrics.registry.register(_WireGuardCollector(self))

    @property
    def device_mtu(self) -> int:
        return self.underlay_mtu - WG_OVERHEAD

    async def start(self) -> None:
        if not self.config.enabled:
            return
        cfg = self.config
        try:
            self.keys = KeyPair.load_or_create(self.hive.state_dir)
            self._publish_key()
            self.attributes.set(POD_MTU, self.device_mtu)
        finally:
            self._attributes_done()
        self.backend = await asyncio.to_thread(
            detect, cfg.backend, cfg.device, self.hive.state_dir, cfg.wireguard_go, self.keys,
            cfg.port, self.device_mtu)
        route_ops = RouteOps(cfg.device, cfg.table, cfg.rule_priority)
        await asyncio.to_thread(route_ops.ensure_rule)
        log.info("encryption on: backend=%s device=%s port=%d public_key=%s", self.backend.name,
                 cfg.device, cfg.port, self.keys.public_b64)
        self.reconcilers = [
            self.hive.reconcile("encryption", "wireguard-peers", self.peers, PeerOps(self.backend),
                                concurrency=512),
            self.hive.reconcile("encryption", "wireguard-routes", self.routes, route_ops),
        ]
        self.hive.spawn("encryption", self._derive(), "derive")
        self.hive.spawn("encryption", self._open_prune(), "initial-sync")

    async def stop(self) -> None:
        pass  # stop is not remove: device, peers and routes keep carrying traffic

    def _publish_key(self) -> None:
        assert self.keys is not None
        self.attributes.set(WIREGUARD_PUBLIC_KEY, self.keys.public_b64)

    async def _open_prune(self) -> None:
        await self.nodes.initialized.wait()
        self._compute()  # from the complete node table, before any prune may run
        for done in self._synced_done:
            done()

    async def _derive(self) -> None:
        async for _ in self.nodes.watch():
            self._compute()

    def _compute(self) -> None:
        cfg = self.config
        me = (self.local.cluster, self.local.name)
        own_key = self.keys.public_bytes if self.keys else b""
        peers: list[Peer] = []
        routes: list[EncryptedRoute] = []
        refused: dict[str, str] = {}
        owners: dict[bytes, tuple[str, str]] = {}
        for node in sorted(self.nodes.all(), key=lambda n: n.key):
            if node.key == me:
                continue
            name = f"{node.cluster}/{node.name}"
            cidrs = [c for c in (node.ipv4_alloc_cidr, node.ipv6_alloc_cidr) if c]
            endpoint = node.internal_ip()
            peer = None
            if not node.wireguard_pubkey:
                refused[name] = "no WireGuard public key published"
            elif endpoint is None:
                refused[name] = "no node address"
            else:
                try:
                    pub = parse_public_key(node.wireguard_pubkey)
                    if pub == own_key or pub in owners:
                        other = "this node" if pub == own_key else "/".join(owners[pub])
                        raise InvalidKey(f"public key already used by {other}")
                    owners[pub] = node.key
                    peer = Peer(node.key, pub, endpoint, cfg.port,
                                tuple(sorted({*cidrs, *(f"{a.ip}/32" for a in node.addresses)})))
                except InvalidKey as e:
                    refused[name] = str(e)
            if peer is not None:
                peers.append(peer)
            for cidr in cidrs:
                if peer is not None:
                    routes.append(EncryptedRoute(cidr, "device", node.key))
                elif cfg.strict:
                    routes.append(EncryptedRoute(cidr, "blackhole", node.key))
        for name, why in refused.items():
            if self.refused.get(name) != why:
                log.warning("no WireGuard peer for node=%s: %s", name, why)
        self.refused = refused
        self.peers.replace_where(lambda _p: True, peers)
        self.routes.replace_where(lambda _r: True, routes)

    # ---- API ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if not self.config.enabled or self.backend is None or self.keys is None:
            return {"enabled": False}
        info = self.backend.info()
        by_key = {p.public_key: p for p in self.peers}
        now = time.time()
        peers = []
        for pub, p in info.peers.items():
            row = by_key.get(pub)
            peers.append({
                "node": "/".join(row.node) if row else "?", "publicKey": base64.b64encode(pub).decode(),
                "endpoint": p.endpoint, "allowedIPs": p.allowed_ips,
                "latestHandshake": p.last_handshake,
                "handshakeAgeSeconds": round(now - p.last_handshake, 1) if p.last_handshake else None,
                "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes})
        return {"enabled": True, "backend": self.backend.name, "device": self.config.device,
                "publicKey": self.keys.public_b64, "port": info.listen_port, "strict": self.config.strict,
                "mtu": self.device_mtu, "peers": peers, "refused": dict(self.refused),
                "routes": [{"dst": r.dst, "kind": r.kind} for r in self.routes],
                "reconcile": {r.name: r.summary() for r in self.reconcilers}} | {
                    "peers": sorted(peers, key=lambda p: str(p["node"]))}

    async def _status_api(self, _q: dict[str, str], _b: Any) -> Any:
        return await asyncio.to_thread(self.describe)

    async def _rotate_api(self, _q: dict[str, str], _b: Any) -> Any:
        if not self.config.enabled or self.backend is None:
            raise ApiError(409, "encryption is not enabled on this node")
        new = KeyPair.generate()
        await asyncio.to_thread(self.backend.ensure, new, self.config.port, self.device_mtu)
        new.save(self.hive.state_dir)
        self.keys = new
        self._publish_key()
        self._compute()
        log.info("rotated WireGuard key: public_key=%s", new.public_b64)
        return {"publicKey": new.public_b64}

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"enabled": False}
        return {"enabled": True, "backend": self.backend.name if self.backend else "starting",
                "peers": len(self.peers), "refused": len(self.refused)}


class _WireGuardCollector(Collector):
    def __init__(self, enc: Encryption) -> None:
        self.enc = enc

    def collect(self) -> Iterator[Any]:
        peers = GaugeMetricFamily("plexus_wireguard_peers", "Configured WireGuard peers.")
        age = GaugeMetricFamily("plexus_wireguard_handshake_age_seconds",
                                "Seconds since the latest handshake.", labels=["peer"])
        rx = CounterMetricFamily("plexus_wireguard_rx_bytes", "Bytes received.", labels=["peer"])
        tx = CounterMetricFamily("plexus_wireguard_tx_bytes", "Bytes sent.", labels=["peer"])
        refused = GaugeMetricFamily("plexus_wireguard_refused_nodes", "Nodes without a peer.")
        if self.enc.backend is not None:
            try:
                info = self.enc.backend.info()
            except Exception:
                info = None
            if info is not None:
                by_key = {p.public_key: "/".join(p.node) for p in self.enc.peers}
                now = time.time()
                peers.add_metric([], float(len(info.peers)))
                for pub, p in info.peers.items():
                    name = by_key.get(pub, base64.b64encode(pub).decode()[:8])
                    if p.last_handshake:
                        age.add_metric([name], now - p.last_handshake)
                    rx.add_metric([name], float(p.rx_bytes))
                    tx.add_metric([name], float(p.tx_bytes))
        refused.add_metric([], float(len(self.enc.refused)))
        yield from (peers, age, rx, tx, refused)


module = Module(name="encryption", doc=__doc__ or "", config=EncryptionConfig,
                build=lambda hive, cfg: Encryption(hive, cfg))

"""Transparent encryption: a WireGuard peer for every remote node of every cluster.

The private key is made on first start and kept 0600 in the state dir; its public half goes
into this node's record, so every agent of every connected cluster sees it. Remote pod
CIDRs route through the device from a table of their own; stale peers go only after the
node table's first full sync; in strict mode a pod CIDR without a peer is dropped rather
than sent in the clear.

The device is watched (the process's exit through a pidfd, and a periodic check as a
backstop): when it dies it is started again with its key, its peers and routes are applied
again, and the outage is counted and reported. In strict mode a blackhole under every
remote pod CIDR stays in the table for as long as the device is gone.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from clustermesh.models import Node
from clustermesh.ownership import Owned
from clustermesh.tables import GLOBAL_SERVICES, NODES
from clustermesh.vms import VM_NODE_LABEL
from encryption.config import WG_OVERHEAD, EncryptionConfig
from encryption.keys import InvalidKey, KeyPair, parse_public_key
from encryption.ops import RTPROT_PLEXUS, Backend, PeerOps, RouteOps, detect
from encryption.tables import (
    EncryptedRoute,
    Peer,
    peers_table,
    routes_table,
    tunnel_routes_table,
)
from encryption.uapi import DeviceInfo
from plexus.core.api import ApiError
from plexus.core.kernel import kernel_numbers
from plexus.core.module import Hive, Module
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES, POD_MTU, WIREGUARD_PUBLIC_KEY
from plexus.core.reconciler import Reconciler
from plexus.core.tunnels import node_tunnels

log = logging.getLogger(__name__)
CHECK_INTERVAL = 1.0  # the backstop: a device gone without its process exiting is seen this late
RESTART_BACKOFF = (0.1, 2.0)  # first and longest wait between failed restarts


@dataclass(frozen=True)
class Outage:
    """A time the device was gone, and why."""

    since: float  # wall clock
    until: float | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round((self.until or time.time()) - self.since, 3)
        return out


class DeviceHealth:
    """The device's outages: whether it is down now and since when, how many times it was
    restarted, the last outage and the last failed restart."""

    def __init__(self) -> None:
        self.restarts = 0
        self.outages = 0
        self.current: Outage | None = None
        self.last: Outage | None = None
        self.last_error = ""

    def went_down(self, reason: str) -> Outage:
        self.outages += 1
        self.current = Outage(time.time(), None, reason)
        return self.current

    def came_back(self) -> None:
        self.restarts += 1
        self.last_error = ""
        if self.current is not None:
            self.last = Outage(self.current.since, time.time(), self.current.reason)
        self.current = None

    def as_dict(self) -> dict[str, Any]:
        latest = self.current or self.last
        return {"up": self.current is None,
                "downSince": self.current.since if self.current else None,
                "restarts": self.restarts, "outages": self.outages,
                "lastOutage": latest.as_dict() if latest else None,
                "lastError": self.last_error}


def _host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def _held_by(owned: Owned, node: Node, cidrs: list[str]) -> list[str]:
    """The node's pod CIDRs and addresses that overlap what `owned` holds."""
    taken = [c for c in cidrs
             if any(ipaddress.ip_network(c, strict=False).overlaps(o) for o in owned.cidrs)]
    for a in node.addresses:
        addr = ipaddress.ip_address(a.ip)
        host = f"{addr}/{addr.max_prefixlen}"
        if host in owned.node_ips or any(addr in o for o in owned.cidrs):
            taken.append(host)
    return taken


class Encryption:
    def __init__(self, hive: Hive, config: EncryptionConfig,
                 netlink: Netlink = AGENT_NETNS) -> None:
        self.hive = hive
        self.config = config
        self.netlink = netlink
        self.device_health = DeviceHealth()
        self._down_health = ""  # what this module last wrote into the hive's health
        self.local = hive.require(LOCAL_NODE)
        self.nodes = hive.require(NODES)
        self.attributes = hive.require(NODE_ATTRIBUTES)
        self.services = hive.require(GLOBAL_SERVICES) if config.service_frontends else None
        self.peers = peers_table()
        self.routes = routes_table()
        # other nodes' addresses, for the tunnels features run between nodes (by UDP port)
        self.tunnels = node_tunnels(hive)
        self.tunnel_routes = tunnel_routes_table()
        self.underlay_mtu: int = hive.agent.node.mtu
        self.keys: KeyPair | None = None
        self.backend: Backend | None = None
        self.refused: dict[str, str] = {}
        self.reconcilers: list[Reconciler[Any, Any]] = []
        self._synced_done = [self.peers.register_initializer("nodes"),
                             self.routes.register_initializer("nodes"),
                             self.tunnel_routes.register_initializer("nodes")]
        # The node record waits for the key: a restarted agent that registered without it
        # would make every peer drop this node until the key came back.
        self._attributes_done = (self.attributes.register_initializer("encryption")
                                 if config.enabled else lambda: None)
        if config.enabled:
            numbers = kernel_numbers(hive)
            numbers.claim("route-table", config.table, "encryption", "routes of remote pod CIDRs")
            numbers.claim("rule-priority", config.rule_priority, "encryption", "ip rule to its table")
            if config.fwmark:
                numbers.claim("fwmark", config.fwmark, "encryption", "the device's own packets")
                numbers.claim("rule-priority", config.rule_priority - 1, "encryption",
                              "the device's own packets to the main table")
            numbers.claim("route-table", config.tunnel_table, "encryption",
                          "routes of other nodes' addresses for tunnels between nodes")
            numbers.claim("rule-priority", config.tunnel_rule_priority, "encryption",
                          "ip rules sending tunnels' UDP ports to that table")
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
            cfg.port, self.device_mtu, self.netlink, cfg.fwmark)
        if getattr(self.backend, "found_dead", False):
            # died while the agent was down: in strict mode its fallbacks dropped meanwhile
            self.device_health.went_down("wireguard-go was not running at agent start")
            self.device_health.came_back()
            log.warning("wireguard-go device=%s was not running at agent start: started again",
                        cfg.device)
        # Strict mode: the rule may send lookups to the table only once the fallbacks that
        # stop left behind are there, and they are (they have no device to lose); without
        # the rule no route of the table counts, so it is made before any route.
        self.route_ops = RouteOps(cfg.device, cfg.table, cfg.rule_priority, self.netlink,
                                  strict=cfg.strict, fwmark=cfg.fwmark)
        await asyncio.to_thread(self.route_ops.ensure_rule)
        self.tunnel_ops = RouteOps(cfg.device, cfg.tunnel_table, cfg.tunnel_rule_priority,
                                   self.netlink, strict=cfg.strict,
                                   udp_ports=lambda: [t.port for t in self.tunnels])
        await asyncio.to_thread(self.tunnel_ops.ensure_rule)
        log.info("encryption on: backend=%s device=%s port=%d public_key=%s strict=%s",
                 self.backend.name, cfg.device, cfg.port, self.keys.public_b64, cfg.strict)
        self.reconcilers = [
            self.hive.reconcile("encryption", "wireguard-peers", self.peers, PeerOps(self.backend),
                                concurrency=512),
            self.hive.reconcile("encryption", "wireguard-routes", self.routes, self.route_ops),
            self.hive.reconcile("encryption", "wireguard-tunnel-routes", self.tunnel_routes,
                                self.tunnel_ops),
        ]
        self.hive.spawn("encryption", self._follow_tunnels(), "tunnels")
        self.hive.spawn("encryption", self._derive(), "derive")
        if self.services is not None:
            self.hive.spawn("encryption", self._derive_frontends(), "derive-frontends")
        self.hive.spawn("encryption", self._open_prune(), "initial-sync")
        self.hive.spawn("encryption", self._watch_device(), "device-watch")

    async def stop(self) -> None:
        pass  # stop is not remove: device, peers, routes and fallbacks keep their places

    # ---- the device's life ------------------------------------------------------------
    async def _watch_device(self) -> None:
        """Restart the device whenever it is gone; put the rule back whenever it is."""
        while True:
            await self._until_exit_or_checked()
            assert self.backend is not None
            try:
                if not await asyncio.to_thread(self.backend.alive):
                    await self._restore("device gone")
                if await asyncio.to_thread(self.route_ops.ensure_rule):
                    log.warning("ip rule to table %d was missing: added again", self.config.table)
                await asyncio.to_thread(self.tunnel_ops.ensure_rule)
            except Exception as e:  # a failed check (netlink, UAPI) is tried again, never fatal
                log.warning("checking WireGuard device=%s failed: %s", self.config.device, e)

    async def _until_exit_or_checked(self) -> None:
        """Return when the device's process exits, or after `CHECK_INTERVAL`."""
        assert self.backend is not None
        pid = self.backend.pid()
        if pid is None:
            await asyncio.sleep(CHECK_INTERVAL)
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            return
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(fd, exited.set)
            try:
                await asyncio.wait_for(exited.wait(), CHECK_INTERVAL)
            except TimeoutError:
                pass
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _restore(self, reason: str) -> None:
        """Start the device again until it runs, then apply every peer and route again."""
        assert self.backend is not None and self.keys is not None
        cfg = self.config
        outage = self.device_health.went_down(reason)
        log.warning("WireGuard device=%s %s: restarting it (strict=%s: remote pod traffic is %s "
                    "meanwhile)", cfg.device, reason, cfg.strict,
                    "dropped" if cfg.strict else "sent in the clear")
        wait = RESTART_BACKOFF[0]
        while True:
            try:
                await asyncio.to_thread(self.backend.restart, self.keys, cfg.port, self.device_mtu)
                break
            except Exception as e:
                self.device_health.last_error = f"{type(e).__name__}: {e}"
                self._set_health(f"WireGuard device {cfg.device} down since "
                                 f"{time.strftime('%H:%M:%S', time.localtime(outage.since))}, "
                                 f"restart failed: {self.device_health.last_error}")
                log.warning("restarting WireGuard device=%s failed, again in %.1fs: %s",
                            cfg.device, wait, e)
                await asyncio.sleep(wait)
                wait = min(RESTART_BACKOFF[1], wait * 2)
        for rec in self.reconcilers:
            rec.requeue_all()
            rec.request_prune()  # a prune that failed during the outage is cleared now
        self.device_health.came_back()
        self._set_health("")
        log.warning("WireGuard device=%s restarted after %.2fs (restarts=%d)", cfg.device,
                    time.time() - outage.since, self.device_health.restarts)

    def _set_health(self, problem: str) -> None:
        """Say the device is down in the hive's health, or take back only what was said."""
        current = self.hive.health.get("encryption", "ok")
        if problem:
            self.hive.health["encryption"] = problem
        elif current == self._down_health and self._down_health:
            self.hive.health["encryption"] = "ok"
        self._down_health = problem

    def _publish_key(self) -> None:
        assert self.keys is not None
        self.attributes.set(WIREGUARD_PUBLIC_KEY, self.keys.public_b64)

    async def _open_prune(self) -> None:
        await self.nodes.initialized.wait()
        self._compute()  # from the complete node table, before any prune may run
        for done in self._synced_done:
            done()

    async def _follow_tunnels(self) -> None:
        """A tunnel's UDP port added or gone: its rule follows."""
        async for _ in self.tunnels.watch():
            await asyncio.to_thread(self.tunnel_ops.ensure_rule)

    async def _derive(self) -> None:
        async for _ in self.nodes.watch():
            self._compute()

    async def _derive_frontends(self) -> None:
        assert self.services is not None
        async for _ in self.services.watch():
            self._compute()

    def _compute(self) -> None:
        cfg = self.config
        me = (self.local.cluster, self.local.name)
        own_key = self.keys.public_bytes if self.keys else b""
        peers: list[Peer] = []
        routes: list[EncryptedRoute] = []
        tunnel_routes: list[EncryptedRoute] = []
        refused: dict[str, str] = {}
        owners: dict[bytes, tuple[str, str]] = {}
        # What this cluster's nodes hold, no other cluster's node record may route elsewhere.
        local = Owned.of(n for n in self.nodes.all() if n.cluster == self.local.cluster)
        for node in sorted(self.nodes.all(), key=lambda n: n.key):
            if node.key == me:
                continue
            name = f"{node.cluster}/{node.name}"
            cidrs = [c for c in (node.ipv4_alloc_cidr, node.ipv6_alloc_cidr) if c]
            if node.labels.get(VM_NODE_LABEL) and cfg.fwmark:
                # an enrolled host serves at its own address: pods reach it through the device
                cidrs += [_host_prefix(a.ip) for a in node.addresses]
            endpoint = node.internal_ip()
            peer = None
            taken = [] if node.cluster == self.local.cluster else _held_by(local, node, cidrs)
            if taken:
                refused[name] = f"claims addresses of the local cluster: {', '.join(taken)}"
                cidrs = [c for c in cidrs if c not in taken]
            elif not node.wireguard_pubkey:
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
                                tuple(sorted({*cidrs, *(_host_prefix(a.ip) for a in node.addresses)})))
                except InvalidKey as e:
                    refused[name] = str(e)
            if peer is not None:
                peers.append(peer)
            for a in [] if taken else node.addresses:
                # the node's own address as the source: the peer accepts only that one
                src = self.local.ip if ":" not in a.ip and ":" not in self.local.ip else None
                if peer is not None:
                    tunnel_routes.append(EncryptedRoute(_host_prefix(a.ip), "device", node.key, src))
                elif cfg.strict:
                    tunnel_routes.append(EncryptedRoute(_host_prefix(a.ip), "blackhole", node.key))
            for cidr in cidrs:
                if peer is not None:
                    routes.append(EncryptedRoute(cidr, "device", node.key))
                elif cfg.strict:
                    routes.append(EncryptedRoute(cidr, "blackhole", node.key))
        routes += self._frontend_routes({r.dst for r in routes})
        for name, why in refused.items():
            if self.refused.get(name) != why:
                log.warning("no WireGuard peer for node=%s: %s", name, why)
        self.refused = refused
        self.peers.replace_where(lambda _p: True, peers)
        self.routes.replace_where(lambda _r: True, routes)
        self.tunnel_routes.replace_where(lambda _r: True, tunnel_routes)

    def _frontend_routes(self, taken: set[str]) -> list[EncryptedRoute]:
        """Every global service's frontend addresses, through the device: the host's datapath
        translates them there to a backend, whose node's peer then carries the request."""
        if self.services is None:
            return []
        routes: dict[str, EncryptedRoute] = {}
        for svc in self.services.all():
            for ip in svc.frontends:
                try:
                    dst = _host_prefix(ip)
                except ValueError:
                    continue  # not an address: the service's own checks report it
                if dst not in taken:
                    routes.setdefault(dst, EncryptedRoute(dst, "device", svc.key))
        return list(routes.values())

    # ---- API ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if not self.config.enabled or self.backend is None or self.keys is None:
            return {"enabled": False}
        try:
            info = self.backend.info()
        except Exception:  # the device is down (UAPI or netlink): the outage is what to show
            info = DeviceInfo()
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
                "deviceHealth": self.device_health.as_dict(),
                "publicKey": self.keys.public_b64, "port": info.listen_port or self.config.port,
                "strict": self.config.strict,
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
                "peers": len(self.peers), "refused": len(self.refused),
                "strict": self.config.strict, "device": self.device_health.as_dict()}


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
        health = self.enc.device_health
        restarts = CounterMetricFamily("plexus_wireguard_device_restarts",
                                       "Times the WireGuard device was found gone and started again.")
        restarts.add_metric([], float(health.restarts))
        up = GaugeMetricFamily("plexus_wireguard_device_up", "1 while the WireGuard device runs.")
        up.add_metric([], 0.0 if health.current else 1.0)
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
        yield from (peers, age, rx, tx, refused, restarts, up)


module = Module(name="encryption", doc=__doc__ or "", config=EncryptionConfig,
                build=lambda hive, cfg: Encryption(hive, cfg))

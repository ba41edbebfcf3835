"""The eBPF datapath: identity-based policy on every local pod's host-side veth.

Reads the merged tables (ipcache, identities, local endpoints, policy manifests of every
cluster), derives map contents, and reconciles them into maps pinned under `pinDir`. A
restarted agent adopts the pinned maps and replaces the programs in place, so policy is
never lost and traffic never dropped across an upgrade. Stop leaves everything attached.

After the first full derivation a change derives only what it touches: an identity that
appears or vanishes in any cluster changes only the entries of the rules it enters or leaves
(bpf.resolver); an ipcache or node change, only its prefixes (bpf.ipcache).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bpf import attach
from bpf.attach import TC_HANDLE, TC_PRIORITY
from bpf.config import BpfConfig
from bpf.flows import (
    DROP_REASON_OF_EVENT,
    EGRESS_POLICY_OF,
    PROTOCOLS,
    Flow,
    FlowRing,
    Peer,
    observe_request,
    peer_labels,
)
from bpf.ipcache import IpcacheRows, prefix_order
from bpf.lb_service import ServiceLoadBalancer
from bpf.loader import CT_CLOSING, CT_REVNAT, Datapath, LoadError, ct_lifetime, datapath
from bpf.metrics import FlowMetrics
from bpf.models import MANIFEST_KINDS, PlexusNetworkPolicy
from bpf.ops import Attachment, AttachOps, EnforceOps, Ifindexes, IpcacheEntry, IpcacheOps, PolicyOps
from bpf.policy import Enforced, LocalEndpoint, PolicyEntry
from bpf.resolver import Resolver
from clustermesh.models import (
    ID_HOST,
    ID_REMOTE_NODE,
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    RESERVED_IDENTITIES,
    identity_labels,
)
from clustermesh.tables import IDENTITIES, IPCACHE, NODES
from plexus.core.api import ApiError, Routes, TcpServer
from plexus.core.kernel import kernel_numbers
from plexus.core.manifests import MANIFESTS, ManifestCache, ManifestKey
from plexus.core.module import Hive, Key, Module
from plexus.core.node import ENDPOINTS, LOCAL_NODE, NODE_ATTRIBUTES, Endpoint
from plexus.core.reconciler import Reconciler
from plexus.core.tables import Table
from plexus.core.tls import server_context

log = logging.getLogger(__name__)
HOST_LINK_CHECK = 0.5  # seconds between two looks at an enrolled host's interfaces


def _ct_rows(dp: Datapath, pods: dict[int, str]) -> list[dict[str, Any]]:
    now = time.monotonic_ns()
    out = []
    for idx, direction, src, dst, sport, dport, proto, seen, flags in dp.ct_items():
        left = ct_lifetime(proto, flags) - (now - seen) / 1e9
        if left <= 0:
            continue  # expired: the next packet gets a new verdict
        out.append({"endpoint": pods.get(idx, ""), "ifindex": idx,
                    "direction": "ingress" if direction else "egress", "source": src,
                    "destination": dst, "sourcePort": sport, "destinationPort": dport,
                    "protocol": proto, "expiresIn": round(left, 1), "service": bool(flags & CT_REVNAT),
                    "closing": bool(flags & CT_CLOSING)})
    return sorted(out, key=lambda r: (r["endpoint"], r["ifindex"], r["direction"], r["source"],
                                      r["destination"], r["sourcePort"], r["destinationPort"]))


def _policy_name(key: ManifestKey) -> str:
    cluster, _kind, namespace, name = key
    return f"{cluster}/{namespace}/{name}"


class BpfDatapath:
    def __init__(self, hive: Hive, config: BpfConfig) -> None:
        self.hive = hive
        self.config = config
        self.loaded = asyncio.Event()  # set once `dp` holds the loaded program (features wait)
        hive.provide(DATAPATH, self)
        self.local = hive.require(LOCAL_NODE)
        self.endpoints = hive.require(ENDPOINTS)
        self.ipcache_src = hive.require(IPCACHE)
        self.identities = hive.require(IDENTITIES)
        self.manifests = hive.require(MANIFESTS)
        self.nodes = hive.require(NODES)
        self.ipcache: Table[str, IpcacheEntry] = Table("bpf-ipcache", key=lambda e: e.key)
        self.entries: Table[tuple[str, int, int, int, int], PolicyEntry] = Table(
            "bpf-policy", key=lambda e: e.key)
        self.enforced: Table[tuple[str, int], Enforced] = Table("bpf-enforce", key=lambda e: e.key)
        self.attachments: Table[str, Attachment] = Table("bpf-attach", key=lambda a: a.key)
        # Nothing is pruned before the first derivation from complete sources: a prune of the
        # attachments meanwhile would take the programs off every pod a restart adopted.
        self._gates = [t.register_initializer("sources") for t in
                       (self.ipcache, self.entries, self.enforced, self.attachments)]
        self.policy_cache = ManifestCache(MANIFEST_KINDS, log)
        self.rejected: dict[str, str] = {}
        self.policies: dict[str, PlexusNetworkPolicy] = {}
        self.dp: Datapath | None = None
        self.ifindexes = Ifindexes()
        self.reconcilers: list[Reconciler[Any, Any]] = []
        self._dirty = asyncio.Event()
        self._changed: dict[str, set[Any]] = {}  # source table name -> keys changed since
        # an enrolled host (uplink set) is reached by the mesh's nodes: WireGuard, BGP
        self.resolver = Resolver((ID_HOST, ID_REMOTE_NODE) if config.uplink else (ID_HOST,))
        self.ipcache_rows = IpcacheRows(self.local)
        hive.routes.get("/v1/bpf/ipcache", self._ipcache_api)
        hive.routes.get("/v1/bpf/policy/{endpoint}", self._policy_api)
        hive.routes.get("/v1/bpf/policies", self._policies_api)
        hive.routes.get("/v1/bpf/ct", self._ct_api)
        hive.routes.stream("/v1/observe", self._observe)
        hive.routes.get("/v1/flows/status", self._flows_status)
        self.ring = FlowRing(config.flow_ring, node=f"{self.local.cluster}/{self.local.name}")
        self._polling = threading.Event()
        self.flows_server: TcpServer | None = None
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: this turns it into Unix time
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        hive.metrics.registry.register(_Counters(self))
        self.flow_metrics = FlowMetrics(self.ring)
        hive.metrics.registry.register(self.flow_metrics)
        self.lb = ServiceLoadBalancer(hive, enrich=self._enrich, publish=self._record)
        if config.enabled:
            numbers = kernel_numbers(hive)
            numbers.claim("tc-priority", TC_PRIORITY, "bpf", "policy programs on pod veths' clsact hooks")
            numbers.claim("tc-handle", TC_HANDLE, "bpf", "policy programs on pod veths' clsact hooks")
        # An enrolled host's record waits for its datapath: the mesh never sees the host
        # before its programs are on its interfaces and its policy is in the maps.
        self._host_interfaces = frozenset(i for i in (config.uplink, config.tunnel) if i)
        self._host_protected = (hive.require(NODE_ATTRIBUTES).register_initializer("bpf")
                                if config.enabled and self._host_interfaces else None)

    async def start(self) -> None:
        if not self.config.enabled:
            return
        if self._host_protected is not None:
            # compiling takes seconds: an enrolled host's other modules start meanwhile,
            # and its registration waits for the gate
            self.hive.spawn("bpf", self._load(), "load")
        else:
            await self._load()

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            self.dp = await asyncio.to_thread(datapath, self.config.pin_dir)
        except (LoadError, Exception) as e:
            self.hive.health["bpf"] = f"datapath not loaded: {e}"
            log.error("datapath not loaded: %s", e)
            return
        self.loaded.set()
        ifx = self.ifindexes
        self.reconcilers = [
            self.hive.reconcile("bpf", "bpf-attach", self.attachments, AttachOps(
                self.dp, ifx, self.config.uplink, self.config.tunnel)),
            self.hive.reconcile("bpf", "bpf-ipcache", self.ipcache, IpcacheOps(self.dp)),
            self.hive.reconcile("bpf", "bpf-policy", self.entries, PolicyOps(self.dp, ifx)),
            self.hive.reconcile("bpf", "bpf-enforce", self.enforced, EnforceOps(self.dp, ifx)),
        ]
        self.ifindexes = ifx
        loop = asyncio.get_running_loop()
        def lost(count: int) -> None:
            loop.call_soon_threadsafe(self.ring.lost, count)

        self.dp.open_flows(lambda ev: loop.call_soon_threadsafe(self._publish, ev), lost,
                           self.config.flow_buffer_pages)
        # its reconcilers, and its flows polled with ours
        self.lb.start(self.dp.bpf, loop, lost)
        self.start_polling()
        await self._serve_flows()
        for table in (self.endpoints, self.ipcache_src, self.identities, self.manifests, self.nodes):
            self.hive.spawn("bpf", self._follow(table), f"follow-{table.name}")
        self.hive.spawn("bpf", self._derive(), "derive")
        self.hive.spawn("bpf", self._open_gates(), "gates")
        log.info("datapath loaded in %.2fs", time.monotonic() - started)
        if self._host_protected is not None:
            self.hive.spawn("bpf", self._protect_host(self._host_protected), "host-protected")
            self.hive.spawn("bpf", self._follow_host_links(self.reconcilers[0]), "host-links")

    async def _protect_host(self, done: Callable[[], None]) -> None:
        """Open the host's gate once its interfaces carry the programs and every entry
        derived from the complete sources is applied."""
        for table in (self.ipcache, self.entries, self.enforced):
            await table.initialized.wait()
        while True:  # a reconciler says whether it is settled, not when: asked every 20 ms
            if (self._host_interfaces <= {a.ifname for a in self.attachments}
                    and all(r.settled() for r in self.reconcilers)):
                break
            await asyncio.sleep(0.02)
        log.info("host datapath in place on %s: the host may register",
                 ", ".join(sorted(self._host_interfaces)))
        done()

    async def _follow_host_links(self, attaching: Reconciler[str, Attachment]) -> None:
        """An enrolled host's WireGuard device is made anew, with a new index and no programs,
        whenever its process restarts: attach again as soon as the new one is seen."""
        netlink = self.ifindexes.netlink
        while True:
            await asyncio.sleep(HOST_LINK_CHECK)
            for name in sorted(self._host_interfaces):
                known = self.ifindexes.cache.get(name)
                now = await asyncio.to_thread(attach.ifindex, name, netlink)
                if known is not None and now is not None and now != known:
                    log.warning("interface %s is new (index %d, was %d): attaching the datapath "
                                "again", name, now, known)
                    attaching.requeue([name])

    async def stop(self) -> None:
        # programs stay attached and maps pinned: traffic keeps its policy
        self._polling.clear()
        if self.flows_server is not None:
            await self.flows_server.stop()

    async def _serve_flows(self) -> None:
        """The relay's view of this node: the same observe stream, over mutual TLS."""
        cfg = self.config.flows_server
        if cfg is None:
            return
        routes = Routes()
        routes.stream("/v1/observe", self._observe)
        routes.get("/v1/flows/status", self._flows_status)
        tls = server_context(cfg.ca_file, cfg.cert_file, cfg.key_file)
        self.flows_server = TcpServer(routes, cfg.address, cfg.port, tls, tuple(cfg.client_names))
        try:
            await self.flows_server.start()
        except OSError as e:
            self.hive.health["bpf"] = f"flows not served on {cfg.address}:{cfg.port}: {e.strerror or e}"
            log.error("%s", self.hive.health["bpf"])
            return
        log.info("flows served to %s on %s:%d (mutual TLS)", ",".join(cfg.client_names), cfg.address,
                 self.flows_server.port)

    # ---- flows ----------------------------------------------------------------------
    def start_polling(self) -> None:
        """Read the kernel's flow buffers on a thread of their own (until `_polling` clears)."""
        self._polling.set()
        threading.Thread(target=self._poll, name="bpf-flows", daemon=True).start()

    def _poll(self) -> None:
        assert self.dp is not None
        while self._polling.is_set():
            self.dp.poll_flows(200)

    def _publish(self, ev: dict[str, Any]) -> None:
        self._record(self._enrich(ev))

    def _record(self, flow: Flow) -> None:
        self.flow_metrics.observe(flow)
        self.ring.record(flow)

    def _peer(self, ip: str, port: int, identity: int | None = None) -> Peer:
        """What the mesh knows of `ip`: its identity, labels, namespace, pod and cluster."""
        known = self.ipcache_src.get(f"{ip}/{128 if ':' in ip else 32}")
        ident_id = identity if identity is not None else (known.identity if known else 0)
        ident = self.identities.get(ident_id)
        if ident is not None:
            labels = ident.labels
        else:
            labels = (RESERVED_IDENTITIES.get(ident_id, f"cidr-or-unknown:{ident_id}"),) if ident_id else ()
        ns, cluster = peer_labels(labels)
        if known is not None:
            ns = known.namespace or ns
            cluster = cluster or known.cluster
        if ident is not None and not cluster:
            cluster = ident.cluster
        return Peer(ip=ip, port=port, identity=ident_id, labels=tuple(labels), namespace=ns,
                    pod=known.pod_name if known else "", cluster=cluster)

    def _enrich(self, ev: dict[str, Any]) -> Flow:
        """A datapath event as a flow: the local pod (by the veth it came through) and the peer
        (by the identity the datapath looked up) with all the mesh knows of them."""
        if "nat" in ev:
            return self._egress_flow(ev)
        by_ifindex = {v: k for k, v in self.ifindexes.cache.items()}
        ep = next((e for e in self.endpoints if e.host_ifname == by_ifindex.get(ev["ifindex"])), None)
        egress = ev["direction"] == 0
        local_ip, peer_ip = (ev["src"], ev["dst"]) if egress else (ev["dst"], ev["src"])
        local_port, peer_port = (ev["sport"], ev["dport"]) if egress else (ev["dport"], ev["sport"])
        local = self._peer(local_ip, local_port)
        if ep is not None:
            local = Peer(ip=local_ip, port=local_port, identity=local.identity,
                         labels=local.labels or tuple(f"k8s:{k}={v}" for k, v in sorted(ep.labels.items())),
                         namespace=ep.namespace, pod=ep.pod_name, cluster=self.local.cluster)
        peer = self._peer(peer_ip, peer_port, ev["identity"])
        src, dst = (local, peer) if egress else (peer, local)
        dropped = ev["verdict"] != 1
        ts = ev.get("ts")
        return Flow(time_ns=ts + self._wall_offset_ns if ts else time.time_ns(),
                    node=self.ring.node, kind="policy-verdict",
                    verdict="DROPPED" if dropped else "FORWARDED",
                    direction="EGRESS" if egress else "INGRESS",
                    protocol=PROTOCOLS.get(ev["proto"], str(ev["proto"])), source=src, destination=dst,
                    drop_reason=(DROP_REASON_OF_EVENT.get(ev.get("reason", 0), "POLICY_DENIED")
                                 if dropped else ""), tcp_flags=ev.get("tcp_flags", 0))

    def _egress_flow(self, ev: dict[str, Any]) -> Flow:
        """A translation this egress gateway made: the pod (of any cluster), its peer, the
        egress IP and port, and the policy behind it (named by the egress module)."""
        ip, port = ev["nat"]
        policy_of = self.hive.optional(EGRESS_POLICY_OF)
        ts = ev.get("ts")
        return Flow(time_ns=ts + self._wall_offset_ns if ts else time.time_ns(),
                    node=self.ring.node, kind="egress-gateway", verdict="TRANSLATED",
                    direction="EGRESS", protocol=PROTOCOLS.get(ev["proto"], str(ev["proto"])),
                    source=self._peer(ev["src"], ev["sport"]),
                    destination=self._peer(ev["dst"], ev["dport"], ev["identity"]),
                    tcp_flags=ev.get("tcp_flags", 0),
                    egress_policy=policy_of(ev["src"], ev["dst"]) if policy_of else "",
                    egress_ip=ip, egress_port=port)

    def _observe(self, q: dict[str, str]) -> AsyncGenerator[Any, None]:
        return observe_request(self.ring, q)

    async def _flows_status(self, _q: dict[str, str], _b: Any) -> Any:
        return {"node": self.ring.node, **self.ring.status()}

    async def _open_gates(self) -> None:
        for t in (self.ipcache_src, self.identities, self.manifests, self.nodes):
            await t.initialized.wait()
        # Derive from the complete sources before any prune may run, or a prune could remove
        # entries that a not-yet-derived row still needs.
        self.recompute()
        for done in self._gates:
            done()

    async def _follow(self, table: Table[Any, Any]) -> None:
        async for keys in table.watch():
            self._changed.setdefault(table.name, set()).update(keys)
            self._dirty.set()

    async def _derive(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.005)  # one pass for a burst of changes
            self._dirty.clear()
            changed, self._changed = self._changed, {}
            self.apply(changed)

    # ---- derivation -----------------------------------------------------------------
    def _load_policies(self) -> None:
        self.policy_cache.sync(self.manifests)
        self.policies = {_policy_name(k): p for k, p in self.policy_cache.parsed(PlexusNetworkPolicy).items()}
        self.rejected = {_policy_name(k): why for k, why in self.policy_cache.problems.items()}

    def _local_endpoint(self, ep: Endpoint) -> LocalEndpoint:
        labels = {k.partition(":")[2].partition("=")[0]: k.partition("=")[2]
                  for k in identity_labels(self.local.cluster, ep.namespace, ep.labels)}
        labels.setdefault(LABEL_CLUSTER, self.local.cluster)
        labels.setdefault(LABEL_NAMESPACE, ep.namespace)
        return LocalEndpoint(ep.host_ifname, ep.ip, labels)

    def recompute(self) -> None:
        """Derive everything from scratch (the first time, and for changes `apply` does not
        know how to derive on their own)."""
        self._changed.clear()
        self._load_policies()
        local = {ep.key: self._local_endpoint(ep) for ep in self.endpoints}
        self.resolver.reset(self.policies, {i.id: i.label_map() for i in self.identities}, local)
        # ipcache: every endpoint of every cluster (both families), node IPs, CIDRs policies name
        self.ipcache_rows = IpcacheRows.build(self.local, self.nodes, self.resolver.cidrs.ids)
        self.ipcache.replace_where(lambda _r: True, self.ipcache_rows.all(self.ipcache_src).values())
        self.attachments.replace_where(lambda _r: True, [Attachment(e.ifname) for e in local.values()])
        self.entries.replace_where(lambda _r: True, self.resolver.entries())
        self.enforced.replace_where(lambda _r: True, self.resolver.enforced())

    def apply(self, changed: dict[str, set[Any]]) -> None:
        """Derive what the changed keys of the source tables touch, and only that."""
        known = {t.name for t in (self.endpoints, self.ipcache_src, self.identities,
                                  self.manifests, self.nodes)}
        if not changed.keys() <= known:
            self.recompute()
            return
        prefixes: set[str] = set(changed.get(self.ipcache_src.name, ()))
        if self.manifests.name in changed:
            before = set(self.policies)
            self._load_policies()
            for name in before | set(self.policies):
                self.resolver.set_policy(name, self.policies.get(name))
            prefixes |= self.ipcache_rows.set_cidrs(self.resolver.cidrs.ids)
        for ident in changed.get(self.identities.name, ()):
            row = self.identities.get(ident)
            self.resolver.set_identity(ident, row.label_map() if row is not None else None)
        for key in changed.get(self.nodes.name, ()):
            prefixes |= self.ipcache_rows.set_node(key, self.nodes.get(key))
        ifnames: set[str] = set()
        for key in changed.get(self.endpoints.name, ()):
            old = self.resolver.endpoints.get(key)
            ep = self.endpoints.get(key)
            new = self._local_endpoint(ep) if ep is not None else None
            self.resolver.set_endpoint(key, new)
            ifnames.update(e.ifname for e in (old, new) if e is not None)
        for name in ifnames:
            if any(e.ifname == name for e in self.resolver.endpoints.values()):
                self.attachments.upsert(Attachment(name))
            else:
                self.attachments.delete(name)
        for prefix in prefixes:
            ipc = self.ipcache_rows.row(prefix, self.ipcache_src.get(prefix))
            if ipc is None:
                self.ipcache.delete(prefix)
            else:
                self.ipcache.upsert(ipc)
        entries, enforced = self.resolver.drain()
        for key, entry in entries:
            if entry is None:
                self.entries.delete(key)
            else:
                self.entries.upsert(entry)
        for ekey, enf in enforced:
            if enf is None:
                self.enforced.delete(ekey)
            else:
                self.enforced.upsert(enf)

    # ---- API ------------------------------------------------------------------------
    def _need(self) -> Datapath:
        if self.dp is None:
            raise ApiError(409, "the eBPF datapath is not loaded on this node")
        return self.dp

    async def _ipcache_api(self, _q: dict[str, str], _b: Any) -> Any:
        dp = self._need()
        return [{"prefix": p, "identity": v[0], "hostIP": v[1], "flags": v[2]}
                for p, v in sorted(dp.ipcache_items().items(), key=lambda kv: prefix_order(kv[0]))]

    async def _policy_api(self, q: dict[str, str], _b: Any) -> Any:
        dp = self._need()
        wanted = q["endpoint"]
        ep = next((e for e in self.endpoints if wanted in (e.container_id, e.pod_name, e.ip,
                                                            e.host_ifname)), None)
        if ep is None:
            raise ApiError(404, f"no local endpoint {wanted}")
        from bpf.attach import ifindex

        idx = await asyncio.to_thread(ifindex, ep.host_ifname)
        entries = [{"identity": i, "port": port, "proto": proto,
                    "direction": "ingress" if d else "egress",
                    "action": "allow" if a == 1 else "deny"}
                   for (x, i, port, proto, d, a) in dp.policy_items() if x == idx]
        enforced = ["ingress" if d else "egress" for (x, d) in dp.enforce_items() if x == idx]
        return {"endpoint": ep.container_id, "pod": f"{ep.namespace}/{ep.pod_name}",
                "interface": ep.host_ifname, "ifindex": idx, "enforced": sorted(enforced),
                "entries": sorted(entries, key=lambda e: (e["direction"], e["identity"], e["port"]))}

    async def _ct_api(self, _q: dict[str, str], _b: Any) -> Any:
        """Live conntrack entries, with the endpoint each belongs to."""
        from bpf.attach import ifindex

        dp = self._need()
        pods = {}
        for ep in self.endpoints:
            idx = ifindex(ep.host_ifname)
            if idx is not None:
                pods[idx] = f"{ep.namespace}/{ep.pod_name}"
        return await asyncio.to_thread(_ct_rows, dp, pods)  # up to 786k entries: off the loop

    async def _policies_api(self, _q: dict[str, str], _b: Any) -> Any:
        return {"policies": sorted(self.policies), "rejected": self.rejected}

    def status(self) -> dict[str, Any]:
        if not self.config.enabled:
            return {"enabled": False}
        return {"enabled": True, "loaded": self.dp is not None, "pinDir": str(self.config.pin_dir),
                "ipcache": len(self.ipcache), "policyEntries": len(self.entries),
                "policies": len(self.policies), "rejected": len(self.rejected),
                "lb": self.lb.status(), "flows": self.ring.status(),
                **(self.dp.counter_totals() if self.dp else {})}


class _Counters(Collector):
    def __init__(self, dp: BpfDatapath) -> None:
        self.owner = dp

    def collect(self) -> Iterator[Any]:
        c = CounterMetricFamily("plexus_datapath_packets", "Policy verdicts in the datapath.",
                                labels=["verdict"])
        drops = CounterMetricFamily("plexus_datapath_drops", "Packets the datapath dropped, by reason.",
                                    labels=["reason"])
        if self.owner.dp is not None:
            for name, value in self.owner.dp.counter_totals().items():
                c.add_metric([name], float(value))
            for reason, value in self.owner.dp.drop_reasons().items():
                drops.add_metric([reason], float(value))
        yield c
        yield drops


DATAPATH: Key[BpfDatapath] = Key("bpf-datapath")  # features write their maps through it

module = Module(name="bpf", doc=__doc__ or "", config=BpfConfig,
                build=lambda hive, cfg: BpfDatapath(hive, cfg))

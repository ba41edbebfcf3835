"""The cluster side: publish a cluster's state into its etcd in Cilium's layout.

Sources are the agents' registrations (nodes, endpoints) and the Service manifests applied
with `plexus apply`. From them the apiserver computes the desired `cilium/state/...` keys
(allocating identities on the way) and writes only the difference; once the first full
pass is written it sets the sync canaries that remote clusters wait for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from clustermesh.identity import Allocator, GarbageCollector
from clustermesh.kvstore import KvError, KvStore
from clustermesh.manifests import MANIFESTS_PREFIX, Service
from clustermesh.models import (
    CLUSTER_CONFIG_PREFIX,
    HEARTBEAT_KEY,
    IPCACHE_PREFIX,
    NODE_SOURCE,
    NODES_PREFIX,
    REGISTRATIONS_PREFIX,
    SERVICE_LABEL_EXTERNAL_IPS,
    SERVICE_LABEL_LB_IP,
    SERVICE_LABEL_TRAFFIC_POLICY,
    SERVICES_PREFIX,
    WRITTEN_CANARIES,
    ClusterConfig,
    ClusterService,
    EndpointRegistration,
    InvalidValue,
    IPIdentity,
    L4Addr,
    Node,
    NodeAddress,
    decode_json,
    go_time,
    identity_labels,
    synced_key,
)
from clustermesh.session import run_sessions
from clustermesh.vms import VM_NODE_LABEL, VMS_PREFIX, VmHost, VmSpec, parse_vm_key
from clustermesh.watch import Changed, ListWatch, Relisted, Synced
from plexus.core.config import ConfigError, parse
from plexus.core.log import Fields
from plexus.core.reconciler import Backoff

HEARTBEAT_TTL = 180
SHOWN_CHARS = 200  # of a hostile key or message in status and logs


@dataclass
class Sources:
    nodes: dict[str, Node] = field(default_factory=dict)  # by registration key
    endpoints: dict[str, EndpointRegistration] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    vm_specs: dict[str, VmSpec] = field(default_factory=dict)  # by VM name
    vm_hosts: dict[str, VmHost] = field(default_factory=dict)  # by VM name, while its lease lives
    rejected: dict[str, str] = field(default_factory=dict)  # key -> why


@dataclass
class Counters:
    """What the apiserver did since it started, for status and metrics."""

    puts: int = 0
    deletes: int = 0
    passes: int = 0  # sync passes that wrote something
    etcd_errors: int = 0
    crashes: int = 0  # sessions ended by an unexpected error, then restarted
    last_error: str = ""
    last_error_time: float = 0.0


class ApiServer:
    def __init__(self, kv: KvStore, cluster: str, cluster_id: int, *,
                 gc_grace: float = 300.0, gc_interval: float = 30.0,
                 heartbeat_interval: float = 60.0) -> None:
        self.kv = kv
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.allocator = Allocator(kv, cluster_id)
        self.gc = GarbageCollector(self.allocator, gc_grace)
        self.gc_interval = gc_interval
        self.heartbeat_interval = heartbeat_interval
        self.sources = Sources()
        self.published: dict[str, bytes] = {}
        self.synced = asyncio.Event()
        self.log = Fields(logging.getLogger(__name__), {"cluster": cluster})
        self._dirty = asyncio.Event()
        self.backoff = Backoff(initial=0.2, maximum=30.0)
        self._session_synced = False
        self.ready = False  # this etcd session's initial sync is written
        self.reg_prefix = f"{REGISTRATIONS_PREFIX}/{cluster}/"
        self.svc_prefix = f"{MANIFESTS_PREFIX}/{cluster}/Service/"
        self.vm_prefix = f"{VMS_PREFIX}/{cluster}/"
        self.counters = Counters()
        # What other modules of the control plane add to a node's record (its egress health),
        # by node name: kept apart from the registrations so the agent's own values stay its own.
        self.node_annotations: dict[str, dict[str, str]] = {}
        # The sources, followed across sessions so a relist drops what vanished meanwhile.
        self.watches = {"registrations": ListWatch(kv, self.reg_prefix),
                        "services": ListWatch(kv, self.svc_prefix),
                        "vms": ListWatch(kv, self.vm_prefix)}

    # ---- desired state --------------------------------------------------------------
    async def desired(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        # Snapshots: watch events change the sources while identities are being allocated.
        for node in list(self.sources.nodes.values()):
            if added := self.node_annotations.get(node.name):
                node = dataclasses.replace(node, annotations={**node.annotations, **added})
            out[f"{NODES_PREFIX}/{self.cluster}/{node.name}"] = node.to_json().encode()
        by_ns: dict[str, list[EndpointRegistration]] = {}
        for ep in list(self.sources.endpoints.values()):
            ident = await self.allocator.allocate(identity_labels(
                self.cluster, ep.namespace, ep.labels, service_account=ep.service_account,
                namespace_labels=ep.namespace_labels))
            for ip in filter(None, (ep.ip, ep.ipv6)):
                out[f"{IPCACHE_PREFIX}/{ip}"] = IPIdentity(
                    ip=ip, identity=ident, host_ip=ep.host_ip, namespace=ep.namespace,
                    pod_name=ep.pod_name, service_account=ep.service_account).to_json().encode()
            by_ns.setdefault(ep.namespace, []).append(ep)
        for name, spec in list(self.sources.vm_specs.items()):
            host = self.sources.vm_hosts.get(name)
            if host is not None:  # enrolled and alive: published like a node and its one endpoint
                await self._vm_desired(spec, host, out)
        for svc in list(self.sources.services.values()):
            if not svc.is_global:
                continue
            cs = self._cluster_service(svc, by_ns.get(svc.metadata.namespace, []))
            out[cs.kv_key] = cs.to_json().encode()
        return out

    def annotate_node(self, name: str, key: str, value: str | None) -> None:
        """Add (None: take back) an annotation to the published record of node `name`."""
        added = self.node_annotations.setdefault(name, {})
        if value is None:
            added.pop(key, None)
        else:
            added[key] = value
        if not added:
            del self.node_annotations[name]
        self._dirty.set()

    def registered_nodes(self) -> list[Node]:
        """The nodes of this cluster whose agents registered them."""
        return list(self.sources.nodes.values())

    async def _vm_desired(self, spec: VmSpec, host: VmHost, out: dict[str, bytes]) -> None:
        """Address and labels come from the operator's spec alone, the key from the VM."""
        node = Node(name=spec.name, cluster=self.cluster, cluster_id=self.cluster_id,
                    addresses=(NodeAddress("InternalIP", spec.ip),),
                    labels={**spec.labels, VM_NODE_LABEL: "true"},
                    wireguard_pubkey=host.wireguard_pubkey, source="plexus")
        out[f"{NODES_PREFIX}/{self.cluster}/{spec.name}"] = node.to_json().encode()
        ident = await self.allocator.allocate(identity_labels(self.cluster, spec.namespace,
                                                              spec.labels))
        out[f"{IPCACHE_PREFIX}/{spec.ip}"] = IPIdentity(
            ip=spec.ip, identity=ident, host_ip=spec.ip, namespace=spec.namespace,
            pod_name=spec.name).to_json().encode()

    def _cluster_service(self, svc: Service, endpoints: list[EndpointRegistration]) -> ClusterService:
        spec = svc.spec
        # Keyed by port name, "" for the one unnamed port, as Cilium does: a remote's
        # backends are matched to a frontend port by that name.
        frontend_ports = {p.name or "": L4Addr(p.protocol, p.port) for p in spec.ports}
        backend_ports = {p.name or "": L4Addr(p.protocol, p.target_port or p.port)
                         for p in spec.ports}
        frontends = {}
        for ip in [spec.cluster_ip, spec.load_balancer_ip, *spec.external_ips]:
            if ip is not None:
                frontends[str(ip)] = frontend_ports
        backends: dict[str, dict[str, L4Addr]] = {}
        if spec.selector:
            for ep in endpoints:
                if all(ep.labels.get(k) == v for k, v in spec.selector.items()):
                    backends[ep.ip] = backend_ports
        for b in spec.backends:
            backends[str(b.ip)] = backend_ports
        # What Cilium keeps in annotations rides along as labels, only where it is not the
        # default, so a plain global service is written exactly as Cilium writes it.
        labels = dict(svc.metadata.labels)
        if svc.affinity != "none":
            labels["service.cilium.io/affinity"] = svc.affinity
        if spec.external_traffic_policy != "Cluster":
            labels[SERVICE_LABEL_TRAFFIC_POLICY] = spec.external_traffic_policy
        if spec.load_balancer_ip is not None:
            labels[SERVICE_LABEL_LB_IP] = str(spec.load_balancer_ip)
        if spec.external_ips:
            labels[SERVICE_LABEL_EXTERNAL_IPS] = ",".join(map(str, spec.external_ips))
        return ClusterService(
            cluster=self.cluster, namespace=svc.metadata.namespace, name=svc.metadata.name,
            frontends=frontends, backends=backends, labels=labels, selector=dict(spec.selector),
            shared=svc.is_shared, cluster_id=self.cluster_id)

    async def sync(self) -> int:
        """Write the difference between desired and published; returns writes done."""
        want = await self.desired()
        puts = [(k, v) for k, v in want.items() if self.published.get(k) != v]
        gone = [k for k in self.published if k not in want]
        if puts:
            await self.kv.put_many(puts)
            self.counters.puts += len(puts)
        for k in gone:
            await self.kv.delete(k)
            self.counters.deletes += 1
        self.published = want
        if puts or gone:
            self.counters.passes += 1
            self.log.info("published puts=%d deletes=%d", len(puts), len(gone))
        return len(puts) + len(gone)

    # ---- sources --------------------------------------------------------------------
    def _apply(self, key: str, value: bytes | None) -> None:
        src = self.sources
        if key.startswith(self.vm_prefix):
            self._apply_vm(key, value)
            return
        src.rejected.pop(key, None)
        for table in (src.nodes, src.endpoints, src.services):
            table.pop(key, None)
        if value is None:
            return
        try:
            if key.startswith(self.reg_prefix + "nodes/"):
                node = Node.from_json(value)
                if node.name != key.rsplit("/", 1)[1]:
                    raise InvalidValue(f"node record names {node.name!r}, key says otherwise")
                # Published as Cilium's apiserver publishes a CiliumNode: its cluster, its
                # id and Cilium's source; every other field as the agent registered it.
                src.nodes[key] = dataclasses.replace(
                    node, cluster=self.cluster, cluster_id=self.cluster_id, source=NODE_SOURCE)
            elif key.startswith(self.reg_prefix + "endpoints/"):
                src.endpoints[key] = EndpointRegistration.from_json(value)
            elif key.startswith(self.svc_prefix):
                svc = parse(Service, decode_json(value, f"manifest {key}"), key)
                if key != f"{self.svc_prefix}{svc.metadata.namespace}/{svc.metadata.name}":
                    raise InvalidValue("manifest key does not match its namespace/name")
                src.services[key] = svc
        except (InvalidValue, ConfigError, ValueError) as e:
            self._reject(key, str(e))
        except Exception as e:  # a value no check foresaw: rejected all the same
            self.log.error("decoding key=%s failed", key[:SHOWN_CHARS], exc_info=e)
            self._reject(key, f"{type(e).__name__}: {e}")

    def _apply_vm(self, key: str, value: bytes | None) -> None:
        src = self.sources
        src.rejected.pop(key, None)
        parsed = parse_vm_key(self.cluster, key)
        if parsed is None or parsed[1] not in ("spec", "node"):
            return
        name, what = parsed
        table: dict[str, Any] = src.vm_specs if what == "spec" else src.vm_hosts
        table.pop(name, None)
        if value is None:
            return
        try:
            if what == "spec":
                spec = VmSpec.from_json(value)
                if spec.name != name or spec.cluster != self.cluster:
                    raise InvalidValue("VM spec names another VM or cluster than its key")
                src.vm_specs[name] = spec
            else:
                src.vm_hosts[name] = VmHost.from_json(value)
        except (InvalidValue, ValueError) as e:
            self._reject(key, str(e))

    def _reject(self, key: str, why: str) -> None:
        self.sources.rejected[key] = why[:SHOWN_CHARS]
        self.log.warning("rejected key=%s: %s", key[:SHOWN_CHARS], why[:SHOWN_CHARS])

    async def _follow(self, watch: ListWatch, listed: asyncio.Event) -> None:
        async for update in watch.updates():
            if isinstance(update, Relisted):
                for stale in update.vanished:
                    self._apply(stale, None)
                for item in update.items:
                    self._apply(item.key, item.value)
                self._dirty.set()
            elif isinstance(update, Synced):
                listed.set()
            elif isinstance(update, Changed):
                for ev in update.events:
                    self._apply(ev.key, ev.value if ev.kind == "put" else None)
                self._dirty.set()

    # ---- run ------------------------------------------------------------------------
    async def _adopt_published(self) -> None:
        """Start from what a previous run published, so stale keys are removed."""
        mine = [f"{NODES_PREFIX}/{self.cluster}/", f"{SERVICES_PREFIX}/{self.cluster}/",
                f"{IPCACHE_PREFIX}/"]
        for prefix in mine:
            items, _ = await self.kv.list_prefix(prefix)
            self.published.update({i.key: i.value for i in items})

    async def _heartbeat(self) -> None:
        lease = 0
        while True:
            try:
                if not lease or await self.kv.keepalive_once(lease) <= 0:
                    lease = await self.kv.grant(HEARTBEAT_TTL)
                await self.kv.put(HEARTBEAT_KEY, go_time(time.time()), lease=lease)
            except KvError as e:
                self._etcd_error("heartbeat", e)
                lease = 0
            await asyncio.sleep(self.heartbeat_interval)

    async def _gc(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval)
            in_use = set()
            for k, v in list(self.published.items()):
                if k.startswith(IPCACHE_PREFIX + "/"):
                    try:
                        in_use.add(IPIdentity.from_json(v).identity)
                    except InvalidValue:
                        continue  # adopted from etcd and malformed: the next sync replaces it
            try:
                await self.gc.collect(in_use)
            except KvError as e:
                self._etcd_error("identity gc", e)

    async def run(self) -> None:
        """Serve until cancelled; a lost etcd session is retried with backoff."""
        await run_sessions(self._session, backoff=self.backoff,
                           failed=lambda e: self._etcd_error("etcd session", e),
                           crashed=self._crashed, started=self._session_starting,
                           progressed=lambda: self._session_synced, ended=self._session_ended)

    def _session_starting(self) -> None:
        self._session_synced = False

    def _session_ended(self) -> None:
        self.ready = False

    def _crashed(self, e: BaseException) -> None:
        """Record a session ended by an unexpected error; the run loop starts the next one."""
        while isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
        c = self.counters
        c.crashes += 1
        c.last_error = f"session failed: {type(e).__name__}: {e}"[:SHOWN_CHARS]
        c.last_error_time = time.time()
        self.log.error("session failed, restarting it", exc_info=e)

    def _etcd_error(self, what: str, e: Exception | str) -> None:
        c = self.counters
        c.etcd_errors += 1
        c.last_error, c.last_error_time = f"{what}: {e}", time.time()
        self.log.warning("%s failed: %s", what, e)

    async def _session(self) -> None:
        await self.kv.put(f"{CLUSTER_CONFIG_PREFIX}/{self.cluster}",
                          ClusterConfig(id=self.cluster_id).to_json())
        self.published = {}
        await self._adopt_published()
        listed = {name: asyncio.Event() for name in self.watches}

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._heartbeat())
            for name, watch in self.watches.items():
                tg.create_task(self._follow(watch, listed[name]))
            for ev in listed.values():
                await ev.wait()
            await self.sync()
            for prefix in WRITTEN_CANARIES:
                await self.kv.put(synced_key(self.cluster, prefix), go_time(time.time()))
            self.synced.set()
            self._session_synced = True
            self.ready = True
            self.log.info("initial sync done: canaries written")
            tg.create_task(self._gc())
            while True:
                await self._dirty.wait()
                await asyncio.sleep(0.01)  # let a burst of events land in one pass
                self._dirty.clear()
                await self.sync()

    def status(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "id": self.cluster_id, "synced": self.synced.is_set(),
                "ready": self.ready,
                "nodes": len(self.sources.nodes), "endpoints": len(self.sources.endpoints),
                "services": len(self.sources.services), "vms": len(self.sources.vm_specs),
                "vmsJoined": len(self.sources.vm_specs.keys() & self.sources.vm_hosts.keys()),
                "rejected": dict(self.sources.rejected),
                "published": len(self.published),
                "prefixes": {name: w.status.as_dict() for name, w in self.watches.items()},
                "written": {"puts": self.counters.puts, "deletes": self.counters.deletes,
                            "passes": self.counters.passes},
                "identitiesAllocated": self.allocator.allocated,
                "etcdErrors": self.counters.etcd_errors, "crashes": self.counters.crashes,
                "lastError": self.counters.last_error,
                "lastErrorTime": self.counters.last_error_time}


"""ClusterMesh: this cluster's and every remote cluster's state, merged into tables.

Watches the own cluster's etcd and one etcd per file in the clustermesh config directory
(added, changed and removed files are picked up without a restart), registers this node
and its endpoints for the cluster's apiserver, merges global services, and routes directly
to the pod CIDRs of same-segment nodes of this cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from clustermesh.config import (
    ClusterMeshConfig,
    EtcdSection,
)
from clustermesh.config_dir import (
    FileRead,
    file_stamp,
    follow_directory,
    list_cluster_files,
    read_cluster_file,
)
from clustermesh.kvstore import KvError, KvStore, Tls
from clustermesh.models import InvalidValue, Node, NodeAddress, check_cluster_name
from clustermesh.ops import (
    RT_TABLE_MAIN,
    RTPROT_PLEXUS,
    DirectRoute,
    EndpointRegistrationOps,
    NodeRegistrationOps,
    RouteOps,
)
from clustermesh.ownership import IpcacheMerge
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.services import merge
from clustermesh.tables import (
    BY_CLUSTER,
    BY_NAME,
    GLOBAL_SERVICES,
    IDENTITIES,
    IPCACHE,
    NODES,
    SERVICES,
    global_services_table,
    identities_table,
    ipcache_table,
    nodes_table,
    services_table,
)
from plexus.core.api import ApiError
from plexus.core.kernel import kernel_numbers
from plexus.core.manifests import MANIFESTS, manifests_table
from plexus.core.memory import freeze_built_state
from plexus.core.module import Hive, Module
from plexus.core.node import ENDPOINTS, LOCAL_NODE, NODE_ATTRIBUTES, WIREGUARD_PUBLIC_KEY
from plexus.core.reconciler import Reconciler
from plexus.core.tables import Table

log = logging.getLogger(__name__)



def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> Tls | None:
    return Tls(ca, cert, key) if ca is not None else None


MERGE_SLICE = 2000  # ipcache prefixes merged between two turns of the event loop
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
CACHED_DIGEST = "cached"  # kvstoremesh mode: a remote's file is not read, so never changes


def _boot_id() -> str:
    """This kernel's boot id, which Cilium's nodes carry so peers can tell a reboot."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


class _Remote:
    def __init__(self, watcher: ClusterWatcher, task: asyncio.Task[None], digest: str) -> None:
        self.watcher = watcher
        self.task = task
        self.digest = digest


class ClusterMesh:
    def __init__(self, hive: Hive, config: ClusterMeshConfig) -> None:
        self.hive = hive
        self.config = config
        self.local = hive.require(LOCAL_NODE)
        self.endpoints = hive.require(ENDPOINTS)
        self.tables = MeshTables(
            nodes=hive.provide(NODES, nodes_table()),
            ipcache=hive.provide(IPCACHE, ipcache_table()),
            identities=hive.provide(IDENTITIES, identities_table()),
            services=hive.provide(SERVICES, services_table()),
            manifests=hive.provide(MANIFESTS, manifests_table()))
        self.global_services = hive.provide(GLOBAL_SERVICES, global_services_table())
        self.ipcache_merge = IpcacheMerge(self.local.cluster, self.tables.ip_claims,
                                          self.tables.nodes, self.tables.ipcache,
                                          settled=self._cluster_ready)
        self.node_attributes = hive.require(NODE_ATTRIBUTES)
        self.own_node: Table[str, Node] = Table("own-node", key=lambda n: n.name)
        self.routes: Table[str, DirectRoute] = Table("direct-routes", key=lambda r: r.key)
        self._routes_ready = self.routes.register_initializer("nodes")
        self.enabled = bool(config.etcd.endpoints)
        self._init_done = [t.register_initializer("clustermesh") for t in
                           (self.tables.nodes, self.tables.ipcache, self.tables.identities,
                            self.tables.services, self.tables.manifests)] if self.enabled else []
        self.remotes: dict[str, _Remote] = {}
        self._relist_turns = asyncio.Semaphore(1)  # one cluster's big list decoded at a time
        self.config_errors: dict[str, str] = {}  # cluster (or file) name -> file and reason
        self.config_files: dict[str, str] = {}  # cluster name -> the file(s) an error is about
        self._file_reads: dict[Path, FileRead] = {}
        self.reconcilers: list[Reconciler[Any, Any]] = []
        self.kv: KvStore | None = None
        if self.enabled and config.direct_routes:
            numbers = kernel_numbers(hive)
            numbers.claim("route-table", RT_TABLE_MAIN, "clustermesh", "direct routes to pod CIDRs",
                          shared=True)
            numbers.claim("route-protocol", RTPROT_PLEXUS, "clustermesh", "marks its direct routes",
                          shared=True)
        hive.routes.get("/v1/clustermesh/status", self._status_api)
        hive.routes.get("/v1/clustermesh/tables/{table}", self._table_api)
        hive.metrics.registry.register(_MeshCollector(self))

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled:
            log.info("clustermesh: no etcd configured, standalone node")
            return
        e: EtcdSection = self.config.etcd
        self.kv = KvStore(e.endpoints, _tls(e.trusted_ca_file, e.cert_file, e.key_file))
        owner = "clustermesh"
        own = self._watcher(self.local.cluster, self.kv)
        self.remotes[self.local.cluster] = _Remote(own, self.hive.spawn(owner, own.run(), "own"), "")
        self.reconcilers = [
            self.hive.reconcile(owner, "node-registration", self.own_node,
                                NodeRegistrationOps(self.kv)),
            self.hive.reconcile(owner, "endpoint-registration", self.endpoints,
                                EndpointRegistrationOps(self.kv, self.local.cluster, self.local.name,
                                                        self.local.ip)),
        ] if self.config.registration else []
        if self.config.direct_routes:
            self.reconcilers.append(self.hive.reconcile(owner, "direct-routes", self.routes, RouteOps()))
        self.hive.spawn(owner, self._publish_own_node(), "own-node")
        self.hive.spawn(owner, self._merge_services(), "global-services")
        self.hive.spawn(owner, self._merge_claims(), "ipcache-claims")
        self.hive.spawn(owner, self._merge_owners(), "ipcache-owners")
        self.hive.spawn(owner, self._derive_routes(), "routes")
        if self.config.config_dir is not None:
            self._rescan_config_dir()
            self.hive.spawn(owner, self._watch_config_dir(), "config-dir")
        self.hive.spawn(owner, self._initial_sync(), "initial-sync")

    async def stop(self) -> None:
        # Stop is not remove: registrations and routes stay; tasks end with the hive.
        if self.kv is not None:
            await self.hive.cancel_tasks("clustermesh")
            await self.kv.close()
            for r in self.remotes.values():
                if r.watcher.kv is not self.kv:
                    await r.watcher.kv.close()

    @property
    def via_kvstoremesh(self) -> bool:
        return self.config.mode == "kvstoremesh"

    def _watcher(self, name: str, kv: KvStore) -> ClusterWatcher:
        return ClusterWatcher(name, kv, self.tables, local_cluster=self.local.cluster,
                              local_id=self.local.cluster_id, ids_in_use=self._ids_in_use,
                              cached=self.via_kvstoremesh and name != self.local.cluster,
                              turns=self._relist_turns, on_ready=self._cluster_became_ready)

    def _cluster_became_ready(self) -> None:
        if all(r.watcher.status.ready for r in self.remotes.values()):
            freeze_built_state()  # the synced rows stay out of full garbage collections

    def _close_remote_kv(self, name: str, kv: KvStore) -> None:
        if kv is not self.kv:  # with KVStoreMesh every remote shares the own etcd's connection
            self.hive.spawn("clustermesh", kv.close(), f"close-{name}")

    def _cluster_ready(self, name: str) -> bool:
        r = self.remotes.get(name)
        return r is not None and r.watcher.status.ready

    def _ids_in_use(self, asking: str) -> dict[int, str]:
        return {r.watcher.status.cluster_id: name for name, r in self.remotes.items()
                if name != asking and r.watcher.status.cluster_id is not None
                and r.watcher.status.connected}

    async def _initial_sync(self) -> None:
        """Open the tables to pruning once every cluster known at start is ready."""
        for r in list(self.remotes.values()):
            await r.watcher.ready_event.wait()
        # complete before the first prune; in slices, so the API keeps answering meanwhile
        prefixes = self.ipcache_merge.start_rebuild()
        await self._refresh_claims(prefixes)
        self.ipcache_merge.finish_rebuild(prefixes)
        for done in self._init_done:
            done()
        self._routes_from(self.tables.nodes.by(BY_CLUSTER, self.local.cluster))  # before the first prune
        self._routes_ready()
        log.info("clustermesh: initial sync of %d cluster(s) complete", len(self.remotes))

    # ---- own node -------------------------------------------------------------------
    def _node_record(self) -> Node:
        return Node(name=self.local.name, cluster=self.local.cluster,
                    cluster_id=self.local.cluster_id,
                    addresses=(NodeAddress("InternalIP", self.local.ip),),
                    ipv4_alloc_cidr=self.local.pod_cidr, ipv6_alloc_cidr=self.local.pod_cidr_v6,
                    labels=dict(self.local.labels),
                    wireguard_pubkey=self.node_attributes.get(WIREGUARD_PUBLIC_KEY) or "",
                    annotations=self.node_attributes.annotations(), boot_id=_boot_id())

    async def _publish_own_node(self) -> None:
        # Modules that add attributes (the WireGuard key) hold the table until they have:
        # a record written without them would take this node out of its peers' view.
        await self.node_attributes.initialized.wait()
        self.own_node.upsert(self._node_record())
        async for _ in self.node_attributes.watch():
            self.own_node.upsert(self._node_record())

    # ---- derived tables -------------------------------------------------------------
    async def _merge_services(self) -> None:
        # Only the names whose copies changed are merged again.
        async for keys in self.tables.services.watch():
            for ns_name in {(ns, name) for _cluster, ns, name in keys}:
                merged = merge(self.tables.services.by(BY_NAME, ns_name), self.local.cluster)
                if merged:
                    self.global_services.upsert(merged[0])
                else:
                    self.global_services.delete(ns_name)

    async def _merge_claims(self) -> None:
        async for keys in self.tables.ip_claims.watch():
            batch = list(keys)  # a cluster's first list is one batch: merged in slices
            for i in range(0, len(batch), MERGE_SLICE):
                self.ipcache_merge.claims_changed(batch[i:i + MERGE_SLICE])
                await asyncio.sleep(0)

    async def _merge_owners(self) -> None:
        # A remote's claims are judged by its node records: re-judge them when those change.
        async for keys in self.tables.nodes.watch():
            await self._refresh_claims(self.ipcache_merge.owners_changed(keys))

    async def _refresh_claims(self, prefixes: set[str]) -> None:
        batch = list(prefixes)
        for i in range(0, len(batch), MERGE_SLICE):
            self.ipcache_merge.refresh(batch[i:i + MERGE_SLICE])
            await asyncio.sleep(0)

    async def _derive_routes(self) -> None:
        async for keys in self.tables.nodes.watch():
            if any(cluster == self.local.cluster for cluster, _ in keys):
                self._routes_from(self.tables.nodes.by(BY_CLUSTER, self.local.cluster))

    def _routes_from(self, nodes: list[Node]) -> None:
        rows = []
        for n in nodes:
            if n.cluster != self.local.cluster or n.name == self.local.name:
                continue
            via = n.internal_ip()
            if via and n.ipv4_alloc_cidr:
                rows.append(DirectRoute(n.ipv4_alloc_cidr, via))
        self.routes.replace_where(lambda _r: True, rows)

    # ---- remote clusters ------------------------------------------------------------
    def _scan_config_dir(self) -> None:
        d = self.config.config_dir
        assert d is not None
        present = list_cluster_files(d)
        for name in [n for n in self.remotes if n != self.local.cluster and n not in present]:
            self._remove_remote(name)
        errors: dict[str, tuple[str, str]] = {}  # name -> (file, reason)
        for name, files in present.items():
            paths = ", ".join(str(p) for p, _ in files)
            if len(files) > 1:
                errors[name] = (paths, f"{paths}: {len(files)} files for cluster {name}; "
                                       "keep one of them")
                continue  # a connection made from one of them keeps working
            path, st = files[0]
            if name == self.local.cluster:
                errors[name] = (paths, f"{path}: names the local cluster")
                continue
            try:
                check_cluster_name(name)
            except InvalidValue as e:
                errors[name] = (paths, f"{path}: {e}")
                continue
            if self.via_kvstoremesh:
                # The file only names the cluster (it may be empty): its copy is read from the
                # own etcd, under cilium/cache/, so what the file says is not used.
                if name not in self.remotes:
                    assert self.kv is not None
                    self._connect_remote(name, self.kv, CACHED_DIGEST)
                continue
            read = self._file_reads.get(path)
            if read is None or read.stamp != file_stamp(st):
                read = self._file_reads[path] = read_cluster_file(path, st)
            if read.config is None:
                errors[name] = (paths, read.error)
                continue  # a bad file never takes down a working connection
            current = self.remotes.get(name)
            if current is not None and current.digest == read.digest:
                continue
            cfg = read.config
            try:
                kv = KvStore(cfg.endpoints, _tls(cfg.ca, cfg.cert_file, cfg.key_file),
                             timeout=cfg.timeout)
            except (KvError, OSError, ValueError) as e:
                errors[name] = (paths, f"{path}: {e}")
                continue
            self._connect_remote(name, kv, read.digest)
        live = {p for files in present.values() for p, _ in files}
        self._file_reads = {p: r for p, r in self._file_reads.items() if p in live}
        for name, (_, why) in errors.items():
            if self.config_errors.get(name) != why:
                log.error("clustermesh config for remote=%s rejected: %s", name, why)
        for name in self.config_errors.keys() - errors.keys():
            log.info("clustermesh config for remote=%s: no problem left", name)
        self.config_errors = {name: why for name, (_, why) in errors.items()}
        self.config_files = {name: file for name, (file, _) in errors.items()}

    def _connect_remote(self, name: str, kv: KvStore, digest: str) -> None:
        current = self.remotes.get(name)
        if current is not None:
            log.info("clustermesh config for remote=%s changed: reconnecting", name)
            current.task.cancel()
            self._close_remote_kv(name, current.watcher.kv)
        watcher = self._watcher(name, kv)
        if current is not None:  # keep what was learned; the relist replaces it
            watcher.status.cluster_id = current.watcher.status.cluster_id
        self.remotes[name] = _Remote(watcher, self.hive.spawn("clustermesh", watcher.run(), name),
                                     digest)
        log.info("clustermesh: connecting to remote=%s", name)

    def _remove_remote(self, name: str) -> None:
        r = self.remotes.pop(name)
        r.task.cancel()
        r.watcher.drain()
        self._close_remote_kv(name, r.watcher.kv)
        log.info("clustermesh: remote=%s removed and drained", name)

    async def _watch_config_dir(self) -> None:
        d = self.config.config_dir
        assert d is not None
        await follow_directory(d, self._rescan_config_dir, self.config.config_poll_interval)

    def _rescan_config_dir(self) -> None:
        try:
            self._scan_config_dir()
        except Exception:  # the next poll tries again; remotes already running keep going
            log.exception("clustermesh: reading the config directory failed")

    # ---- status ---------------------------------------------------------------------
    def remote_status(self) -> dict[str, Any]:
        out = {name: {**r.watcher.status.as_dict(self.tables),
                      **self.ipcache_merge.refusals_of(name).as_dict(),
                      "local": name == self.local.cluster}
               for name, r in self.remotes.items()}
        for name, err in self.config_errors.items():
            out.setdefault(name, {"name": name, "ready": False, "connected": False})
            out[name]["configError"] = err
            out[name]["configFile"] = self.config_files.get(name, "")
        return out

    async def _status_api(self, q: dict[str, str], _b: Any) -> Any:
        data = self.remote_status()
        if "cluster" in q:
            if q["cluster"] not in data:
                raise ApiError(404, f"no cluster {q['cluster']}")
            return data[q["cluster"]]
        return {"enabled": self.enabled, "localCluster": self.local.cluster, "clusters": data,
                "globalServices": len(self.global_services),
                "registration": {r.name: r.summary() for r in self.reconcilers}}

    def listable(self) -> dict[str, Table[Any, Any]]:
        t = self.tables
        return {"nodes": t.nodes, "endpoints": t.ipcache, "identities": t.identities,
                "services": t.services, "global-services": self.global_services,
                "manifests": t.manifests}

    async def _table_api(self, q: dict[str, str], _b: Any) -> Any:
        tables = self.listable()
        if q["table"] not in tables:
            raise ApiError(404, f"no table {q['table']}; one of {', '.join(tables)}")
        table = tables[q["table"]]
        if "cluster" in q and table is not self.global_services:
            return [dataclasses.asdict(r) for r in table.by(BY_CLUSTER, q["cluster"])]
        rows = [dataclasses.asdict(r) for r in table.all()]
        if "cluster" in q:
            rows = [r for r in rows if _contributed_by(r, q["cluster"])]
        return rows

    def status(self) -> dict[str, Any]:
        remotes = {n: r.watcher.status for n, r in self.remotes.items()}
        return {"enabled": self.enabled,
                "clusters": {n: ("ready" if s.ready else "connected" if s.connected else "down")
                             for n, s in remotes.items()},
                "nodes": len(self.tables.nodes), "endpoints": len(self.tables.ipcache),
                "identities": len(self.tables.identities), "services": len(self.tables.services)}


def _contributed_by(row: dict[str, Any], cluster: str) -> bool:
    """Whether `cluster` contributed the row; a merged global service has no cluster of its
    own, its backends have."""
    if "cluster" in row:
        return bool(row["cluster"] == cluster)
    return any(b.get("cluster") == cluster for b in row.get("backends", ()))


class _MeshCollector(Collector):
    """Per-cluster metrics read at scrape time, labelled by target_cluster."""

    def __init__(self, mesh: ClusterMesh) -> None:
        self.mesh = mesh

    def collect(self) -> Iterator[Any]:
        ready = GaugeMetricFamily("plexus_clustermesh_remote_ready",
                                  "1 when the cluster's initial sync is complete.", labels=["target_cluster"])
        entries = GaugeMetricFamily("plexus_clustermesh_remote_entries",
                                    "Entries learned from the cluster.", labels=["target_cluster", "kind"])
        failures = CounterMetricFamily("plexus_clustermesh_remote_failures",
                                       "Connection failures.", labels=["target_cluster"])
        invalid = CounterMetricFamily("plexus_clustermesh_remote_invalid_entries",
                                      "Values rejected by validation.", labels=["target_cluster"])
        events = CounterMetricFamily("plexus_clustermesh_remote_events",
                                     "Watch events received.", labels=["target_cluster"])
        refused = GaugeMetricFamily("plexus_clustermesh_remote_refused_entries",
                                    "The cluster's ipcache claims not applied: addresses or "
                                    "identities it does not own.", labels=["target_cluster"])
        for name, r in list(self.mesh.remotes.items()):
            st = r.watcher.status
            d = st.as_dict(self.mesh.tables)
            ready.add_metric([name], 1.0 if st.ready else 0.0)
            for kind in ("nodes", "endpoints", "identities", "services"):
                entries.add_metric([name, kind], float(d[kind]))
            failures.add_metric([name], float(st.failures))
            invalid.add_metric([name], float(st.invalid_entries))
            events.add_metric([name], float(st.events))
            refused.add_metric([name], float(len(self.mesh.ipcache_merge.refusals_of(name).reasons)))
        yield from (ready, entries, failures, invalid, events, refused)


module = Module(name="clustermesh", doc=__doc__ or "", config=ClusterMeshConfig,
                build=lambda hive, cfg: ClusterMesh(hive, cfg))

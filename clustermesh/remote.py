"""Follow one cluster's etcd into the shared tables: the own cluster and every remote.

Per cluster: read and check its cluster-config, then list and watch each prefix; every
value is validated and a bad one is skipped and counted, never fatal. A lost connection
keeps what was learned; a relist after reconnecting replaces the cluster's rows, so what
vanished meanwhile goes. `drain()` removes everything the cluster contributed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from clustermesh.kvstore import KV, Event, KvError, KvStore
from clustermesh.manifests import MANIFESTS_CACHE_PREFIX, MANIFESTS_PREFIX
from clustermesh.models import (
    CACHED_SYNCED_PREFIXES,
    CLUSTER_CONFIG_PREFIX,
    CLUSTER_ID_MAX,
    IDENTITIES_PREFIX,
    IPCACHE_PREFIX,
    NODES_PREFIX,
    SERVICES_PREFIX,
    SYNCED_PREFIX,
    SYNCED_PREFIXES,
    ClusterConfig,
    ClusterService,
    Identity,
    InvalidValue,
    IPIdentity,
    Node,
    cache_layout,
    check_cluster_name,
    decode_json,
    identity_cluster_id,
    parse_labels,
)
from clustermesh.ownership import MIN_ALLOCATED_IDENTITY, claims_table
from clustermesh.session import run_sessions
from clustermesh.tables import BY_CLUSTER
from clustermesh.watch import Changed, ListWatch, Relisted, Synced
from plexus.core.log import Fields
from plexus.core.manifests import Manifest
from plexus.core.reconciler import Backoff
from plexus.core.tables import Table

K = TypeVar("K")
RECONNECT_BACKOFF = Backoff(initial=0.2, maximum=30.0)
SHOWN_CHARS = 200  # of a hostile key or message in status and logs
RELIST_SLICE = 500  # listed values decoded between two turns of the event loop
R = TypeVar("R")


@dataclass
class MeshTables:
    nodes: Table[Any, Node]
    ipcache: Table[Any, IPIdentity]
    identities: Table[Any, Identity]
    services: Table[Any, ClusterService]
    manifests: Table[Any, Manifest]
    # every cluster's ipcache claims, by (cluster, prefix); `ipcache` holds the winners
    ip_claims: Table[Any, IPIdentity] = field(default_factory=claims_table)


@dataclass
class RemoteStatus:
    name: str
    connected: bool = False
    ready: bool = False
    cluster_id: int | None = None
    config_error: str = ""
    failures: int = 0
    last_failure: str = ""
    last_failure_time: float = 0.0
    crashes: int = 0  # sessions ended by an unexpected error, then restarted
    invalid_entries: int = 0
    last_invalid: str = ""
    synced: dict[str, bool] = field(default_factory=dict)
    events: int = 0

    def as_dict(self, tables: MeshTables) -> dict[str, Any]:
        def count(t: Table[Any, Any]) -> int:
            return t.count(BY_CLUSTER, self.name)  # kept as rows change: no scan
        return {
            "name": self.name, "ready": self.ready, "connected": self.connected,
            "clusterID": self.cluster_id, "configError": self.config_error,
            "nodes": count(tables.nodes), "endpoints": count(tables.ipcache),
            "identities": count(tables.identities), "services": count(tables.services),
            "failures": self.failures, "lastFailure": self.last_failure,
            "crashes": self.crashes,
            "invalidEntries": self.invalid_entries, "lastInvalid": self.last_invalid,
            "synced": dict(self.synced),
        }


class ConfigRejected(Exception):
    """The remote's cluster-config is bad or conflicts; retried slowly, shown in status."""


class _Prefix(Generic[K, R]):
    """One watched prefix: decodes etcd keys into rows of one table.

    `state` is where the cluster's own etcd keeps the kind and `cache` where KVStoreMesh
    copies it; `prefix`, the one watched, is one of the two. Keys are decoded as their
    state key, wherever they were read."""

    def __init__(self, kv: KvStore, state: str, cache: str, table: Table[K, R],
                 decode: Callable[[str, bytes], R], owned: Callable[[R], bool], cached: bool) -> None:
        self.state = state
        self.cache = cache
        self.prefix = cache if cached else state
        self.table = table
        self.decode = decode
        self.owned = owned
        self.keys: dict[str, K] = {}  # etcd key -> table key, to apply deletes
        self.watch = ListWatch(kv, self.prefix)

    def state_key(self, key: str) -> str:
        return self.state + key[len(self.prefix):]

    def cache_key(self, key: str) -> str:
        return self.cache + key[len(self.prefix):]


class ClusterWatcher:
    def __init__(self, name: str, kv: KvStore, tables: MeshTables, *, local_cluster: str,
                 local_id: int, ids_in_use: Callable[[str], dict[int, str]],
                 backoff: Backoff = RECONNECT_BACKOFF,
                 on_event: Callable[[], None] | None = None,
                 on_ready: Callable[[], None] | None = None,
                 max_connected: int = CLUSTER_ID_MAX, cached: bool = False,
                 turns: asyncio.Semaphore | None = None) -> None:
        self.name = name
        self.turns = turns  # shared by every cluster's watcher: who decodes a big list now
        self.cached = cached  # read from KVStoreMesh's copy in the local etcd
        self.max_connected = max_connected
        self.kv = kv
        self.tables = tables
        self.local_cluster = local_cluster
        self.local_id = local_id
        self.ids_in_use = ids_in_use
        self.backoff = backoff
        self.on_event = on_event
        self.on_ready = on_ready  # called each time the cluster becomes ready
        self.status = RemoteStatus(name)
        self.log = Fields(logging.getLogger(__name__), {"remote": name})
        self._session_connected = False
        self._canaries_seen = False
        self._listed: set[str] = set()
        self.ready_event = asyncio.Event()
        cache = {**cache_layout(name), f"{MANIFESTS_PREFIX}/{name}/": f"{MANIFESTS_CACHE_PREFIX}/{name}/"}

        def prefix(state: str, table: Table[Any, Any],
                   decode: Callable[[str, bytes], Any]) -> _Prefix[Any, Any]:
            return _Prefix(kv, state, cache[state], table, decode, self._mine, cached)
        self.prefixes: list[_Prefix[Any, Any]] = [
            prefix(f"{NODES_PREFIX}/{name}/", tables.nodes, self._node),
            prefix(f"{IPCACHE_PREFIX}/", tables.ip_claims, self._ip),
            prefix(f"{IDENTITIES_PREFIX}/", tables.identities, self._identity),
            prefix(f"{SERVICES_PREFIX}/{name}/", tables.services, self._service),
            prefix(f"{MANIFESTS_PREFIX}/{name}/", tables.manifests, self._manifest),
        ]
        self.canaries = ListWatch(kv, f"{SYNCED_PREFIX}/{name}/")
        self.canary_prefixes = CACHED_SYNCED_PREFIXES if cached else SYNCED_PREFIXES

    @property
    def is_local(self) -> bool:
        return self.name == self.local_cluster

    def _mine(self, row: Any) -> bool:
        return getattr(row, "cluster", None) == self.name

    # ---- decoders: each raises InvalidValue -------------------------------------------
    def _check_identity(self, ident: int, what: str) -> None:
        cid = self.status.cluster_id
        if ident >= 256 and identity_cluster_id(ident, self.max_connected) != cid:
            raise InvalidValue(f"{what}: identity {ident} is outside cluster {self.name}'s range")

    def _node(self, key: str, value: bytes) -> Node:
        node = Node.from_json(value)
        if key != f"{NODES_PREFIX}/{node.cluster}/{node.name}" or node.cluster != self.name:
            raise InvalidValue(f"node {node.cluster}/{node.name} does not match key {key}")
        if node.cluster_id and node.cluster_id != self.status.cluster_id:
            raise InvalidValue(f"node {node.name} claims cluster id {node.cluster_id}")
        return node

    def _ip(self, key: str, value: bytes) -> IPIdentity:
        entry = IPIdentity.from_json(value, cluster=self.name)
        if key.rsplit("/", 1)[1] != entry.ip:
            raise InvalidValue(f"ip {entry.ip} does not match key {key}")
        self._check_identity(entry.identity, f"ip {entry.ip}")
        return entry

    def _identity(self, key: str, value: bytes) -> Identity:
        tail = key.rsplit("/", 1)[1]
        if not tail.isdigit():
            raise InvalidValue(f"identity key {key} is not numeric")
        ident = int(tail)
        self._check_identity(ident, f"identity {ident}")
        if ident < MIN_ALLOCATED_IDENTITY and not self.is_local:
            # Reserved identities are this agent's own; labels from a peer would let it
            # redefine what "host" or "world" selects.
            raise InvalidValue(f"identity {ident} is reserved: a remote cluster may not define it")
        return Identity(ident, parse_labels(value, f"identity {ident}"), cluster=self.name)

    def _service(self, key: str, value: bytes) -> ClusterService:
        svc = ClusterService.from_json(value)
        if svc.cluster != self.name or key != svc.kv_key:
            raise InvalidValue(f"service {svc.namespace}/{svc.name} does not match key {key}")
        return svc

    def _manifest(self, key: str, value: bytes) -> Manifest:
        parts = key[len(MANIFESTS_PREFIX) + 1:].split("/")
        if len(parts) != 4:
            raise InvalidValue(f"manifest key {key} is not <cluster>/<kind>/<ns>/<name>")
        body = decode_json(value, f"manifest {key}")
        if not isinstance(body, dict):
            raise InvalidValue(f"manifest {key}: expected an object")
        return Manifest(cluster=parts[0], kind=parts[1], namespace=parts[2], name=parts[3], body=body)

    # ---- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Follow the cluster until cancelled: whatever ends a session, the next one starts
        after a backoff, and status says not ready and why meanwhile."""
        await run_sessions(self._session, backoff=self.backoff, expected=(ConfigRejected, KvError),
                           failed=self._session_failed, crashed=self._crashed,
                           started=self._session_starting,
                           progressed=lambda: self._session_connected, ended=self._session_ended)

    def _session_starting(self) -> None:
        self._session_connected = False

    def _session_ended(self) -> None:
        self.status.connected = False
        self.status.ready = False

    def _session_failed(self, e: Exception | str) -> None:
        self._failed(str(e), config=isinstance(e, ConfigRejected))

    def _crashed(self, e: BaseException) -> None:
        self.status.crashes += 1
        self.log.error("watcher failed, restarting it", exc_info=e)
        self._failed(f"watcher failed: {_describe(e)}")

    def _failed(self, why: str, config: bool = False) -> None:
        st = self.status
        st.failures += 1
        st.last_failure, st.last_failure_time = why, time.time()
        if config:
            st.config_error = why
            st.ready = False
        self.log.warning("connection failed (%d): %s", st.failures, why)

    async def _read_config(self) -> ClusterConfig:
        got = await self.kv.get(f"{CLUSTER_CONFIG_PREFIX}/{self.name}")
        if got is None:
            raise ConfigRejected(f"cluster-config of {self.name} is not there yet")
        try:
            check_cluster_name(self.name)
            cfg = ClusterConfig.from_json(got.value)
        except InvalidValue as e:
            raise ConfigRejected(f"bad cluster-config: {e}") from None
        if cfg.max_connected_clusters != self.max_connected:
            # Cilium refuses this too (pkg/clustermesh/types CiliumClusterConfig validation): the cluster
            # id sits in different identity bits, so every identity would be misread.
            raise ConfigRejected(
                f"cluster {self.name} is set up for maxConnectedClusters "
                f"{cfg.max_connected_clusters} and this cluster for {self.max_connected}: "
                "every cluster of a mesh must use the same value")
        if self.is_local:
            if cfg.id != self.local_id:
                raise ConfigRejected(f"own cluster-config says id {cfg.id}, this agent has {self.local_id}")
        else:
            if cfg.id == self.local_id:
                raise ConfigRejected(f"cluster id {cfg.id} is the same as the local cluster's")
            other = self.ids_in_use(self.name).get(cfg.id)
            if other:
                raise ConfigRejected(f"cluster id {cfg.id} is already used by cluster {other}")
        return cfg

    async def _session(self) -> None:
        cfg = await self._read_config()
        st = self.status
        if st.cluster_id is not None and st.cluster_id != cfg.id:
            self.log.warning("cluster id changed %s -> %s: draining", st.cluster_id, cfg.id)
            self.drain()
        st.cluster_id = cfg.id
        self._listed.clear()
        st.connected = True
        self._session_connected = True
        st.config_error = ""
        self.log.info("connected cluster_id=%d", cfg.id)
        await self._connected(cfg)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_canaries())
            for p in self.prefixes:
                tg.create_task(self._follow(p))

    async def _connected(self, cfg: ClusterConfig) -> None:
        """Called once the cluster-config is read and accepted, before anything is listed."""

    async def _watch_canaries(self) -> None:
        prefix = self.canaries.prefix
        keys: set[str] = set()
        async for update in self.canaries.updates():
            if isinstance(update, Relisted):
                keys = {i.key for i in update.items}
            elif isinstance(update, Changed):
                for ev in update.events:
                    (keys.add if ev.kind == "put" else keys.discard)(ev.key)
            self.status.synced = {p: f"{prefix}{p}" in keys for p in self.canary_prefixes}
            self._canaries_seen = all(self.status.synced.values())
            self._update_ready()

    def _update_ready(self) -> None:
        ready = self._canaries_seen and len(self._listed) == len(self.prefixes)
        became = ready and not self.status.ready
        self.status.ready = ready
        if became:
            self.log.info("ready: cluster-config read, every prefix listed and synced")
            self.ready_event.set()
            if self.on_ready is not None:
                self.on_ready()

    def _decode(self, p: _Prefix[Any, Any], key: str, value: bytes) -> Any:
        try:
            return p.decode(key, value)
        except InvalidValue as e:
            self._invalid(key, str(e))
        except Exception as e:  # a value no check foresaw: still one skipped entry
            self.log.error("decoding key=%s failed", key[:SHOWN_CHARS], exc_info=e)
            self._invalid(key, f"{key}: {_describe(e)}")
        return None

    def _invalid(self, key: str, why: str) -> None:
        self.status.invalid_entries += 1
        self.status.last_invalid = why[:SHOWN_CHARS]
        self.log.warning("skipped key=%s: %s", key[:SHOWN_CHARS], why[:SHOWN_CHARS])

    async def _follow(self, p: _Prefix[Any, Any]) -> None:
        async for update in p.watch.updates():
            if isinstance(update, Relisted):
                await self._on_relist(p, update.items)
            elif isinstance(update, Synced):
                self._listed.add(p.prefix)
                self._update_ready()
                self._notify()
            else:
                await self._on_changes(p, update.events)

    # What a list and a batch of events do: the agent fills its tables; KVStoreMesh
    # (a subclass) copies into the local etcd instead.
    async def _on_relist(self, p: _Prefix[Any, Any], items: tuple[KV, ...]) -> None:
        if self.turns is None or len(items) <= RELIST_SLICE:
            self._relist(p, items)
            return
        # A big list is decoded in slices, one cluster at a time: between two slices the
        # event loop answers the API, whatever the number of clusters listing at once.
        async with self.turns:
            keys: dict[str, Any] = {}
            rows: dict[Any, Any] = {}
            for i in range(0, len(items), RELIST_SLICE):
                self._decode_into(p, items[i:i + RELIST_SLICE], keys, rows)
                await asyncio.sleep(0)
            self._replace(p, keys, rows)

    async def _on_changes(self, p: _Prefix[Any, Any], events: tuple[Event, ...]) -> None:
        self._apply(p, events)

    def _relist(self, p: _Prefix[Any, Any], items: tuple[KV, ...]) -> None:
        keys: dict[str, Any] = {}
        rows: dict[Any, Any] = {}
        self._decode_into(p, items, keys, rows)
        self._replace(p, keys, rows)

    def _decode_into(self, p: _Prefix[Any, Any], items: tuple[KV, ...], keys: dict[str, Any],
                     rows: dict[Any, Any]) -> None:
        for item in items:
            row = self._decode(p, p.state_key(item.key), item.value)
            if row is not None:
                keys[item.key] = key = p.table.key_of(row)
                rows[key] = row

    def _replace(self, p: _Prefix[Any, Any], keys: dict[str, Any], rows: dict[Any, Any]) -> None:
        # A relist replaces this cluster's rows (and looks at no other cluster's): what
        # vanished while we were away goes.
        p.keys = keys
        p.table.replace_in(BY_CLUSTER, self.name, rows.values())

    def _apply(self, p: _Prefix[Any, Any], events: tuple[Event, ...]) -> None:
        for ev in events:
            self.status.events += 1
            old = p.keys.pop(ev.key, None)
            row = self._decode(p, p.state_key(ev.key), ev.value) if ev.kind == "put" else None
            if row is not None:
                new = p.table.key_of(row)
                if old is not None and old != new and p.owned(p.table.get(old)):
                    p.table.delete(old)
                p.keys[ev.key] = new
                p.table.upsert(row)
            elif old is not None:
                current = p.table.get(old)
                if current is not None and p.owned(current):
                    p.table.delete(old)
        self._notify()

    def _notify(self) -> None:
        if self.on_event is not None:
            self.on_event()

    def drain(self) -> int:
        """Remove every row this cluster contributed."""
        gone = 0
        for p in self.prefixes:
            gone += len(p.table.delete_in(BY_CLUSTER, self.name))
            p.keys.clear()
        self.status.ready = False
        self.status.synced = {}
        self.log.info("drained rows=%d", gone)
        return gone


def _describe(e: BaseException) -> str:
    """One line naming an unexpected error (the first leaf of a group), cut to a readable size."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"[:SHOWN_CHARS]

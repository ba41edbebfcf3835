"""KVStoreMesh: every remote cluster copied into this cluster's own etcd.

Agents then read the whole mesh from one etcd (`clustermesh.mode: kvstoremesh`). The
layout is Cilium's (pkg/clustermesh/kvstoremesh): a remote's nodes, services, ipcache and
identities under `cilium/cache/<kind>/v1/<remote>/...`, its cluster-config rewritten with
the `cached` capability, and the canaries `cilium/synced/<remote>/cilium/cache/<kind>/v1`
once a kind is copied. Plexus manifests go to `plexus/cache/manifests/v1/<remote>/`.

Each remote is followed by the agent's own watcher (the same cluster-config checks and
value validation); a value the agent would refuse is not copied. A remote that goes away
keeps its copy; one removed from the config directory has its copy deleted. Copies carry
no lease: a restarted KVStoreMesh leaves them for agents to read and, once it has listed
the remote again, deletes what vanished meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clustermesh.config_dir import (
    FileRead,
    file_stamp,
    follow_directory,
    list_cluster_files,
    read_cluster_file,
)
from clustermesh.kvstore import KV, Event, KvError, KvStore, Tls
from clustermesh.models import (
    CACHED_SYNCED_PREFIXES,
    CLUSTER_CONFIG_PREFIX,
    SYNCED_PREFIX,
    ClusterConfig,
    InvalidValue,
    check_cluster_name,
    go_time,
    synced_key,
)
from clustermesh.remote import ClusterWatcher, MeshTables, _Prefix
from clustermesh.tables import identities_table, ipcache_table, nodes_table, services_table
from plexus.core.manifests import manifests_table
from plexus.core.memory import freeze_built_state

log = logging.getLogger(__name__)


class CacheWriter(ClusterWatcher):
    """One remote cluster copied into the local etcd; the rows it validates are not kept."""

    def __init__(self, name: str, kv: KvStore, local: KvStore, *, local_cluster: str, local_id: int,
                 ids_in_use: Callable[[str], dict[int, str]],
                 on_ready: Callable[[], None] | None = None) -> None:
        scratch = MeshTables(nodes_table(), ipcache_table(), identities_table(), services_table(),
                             manifests_table())
        super().__init__(name, kv, scratch, local_cluster=local_cluster, local_id=local_id,
                         ids_in_use=ids_in_use, on_ready=on_ready)
        self.local = local
        self.puts = 0
        self.deletes = 0
        self._canaries: asyncio.Task[None] | None = None

    def entries(self) -> dict[str, int]:
        """Keys copied, by the remote prefix they come from."""
        return {p.state: len(p.keys) for p in self.prefixes}

    async def _connected(self, cfg: ClusterConfig) -> None:
        # What agents check before reading the copy: the remote's id, marked as cached.
        await self.local.put(f"{CLUSTER_CONFIG_PREFIX}/{self.name}", ClusterConfig(
            id=cfg.id, synced_canaries=True, cached=True, max_connected_clusters=cfg.max_connected_clusters,
            service_exports_enabled=cfg.service_exports_enabled).to_json())
        if self._canaries is None:
            self._canaries = asyncio.create_task(self._write_canaries())

    async def _write_canaries(self) -> None:
        """Once every kind is copied (and the remote said it was synced): say so, as Cilium's
        kvstoremesh does, under the cache prefixes."""
        await self.ready_event.wait()
        for attempt in range(1, 1_000_000):
            try:
                now = go_time(time.time())  # what Cilium's syncstore writes
                await self.local.put_many([(synced_key(self.name, p), now) for p in CACHED_SYNCED_PREFIXES])
                return
            except KvError as e:
                self.log.warning("writing the synced canaries failed: %s", e)
                await asyncio.sleep(min(30.0, 0.2 * 2 ** min(attempt, 8)))

    def _valid(self, p: _Prefix[Any, Any], key: str, value: bytes) -> bool:
        return self._decode(p, p.state_key(key), value) is not None

    async def _on_relist(self, p: _Prefix[Any, Any], items: tuple[KV, ...]) -> None:
        fresh = {p.cache_key(i.key): i.value for i in items if self._valid(p, i.key, i.value)}
        held, _ = await self.local.list_prefix(p.cache)
        had = {kv.key: kv.value for kv in held}
        stale = [k for k in had if k not in fresh]  # vanished while nobody copied them
        changed = [(k, v) for k, v in fresh.items() if had.get(k) != v]
        await self.local.write_many(changed, stale)
        self.puts += len(changed)
        self.deletes += len(stale)
        p.keys = {p.state + k[len(p.cache):]: k for k in fresh}
        self._notify()

    async def _on_changes(self, p: _Prefix[Any, Any], events: tuple[Event, ...]) -> None:
        puts: dict[str, bytes] = {}
        deletes: set[str] = set()
        for ev in events:
            self.status.events += 1
            target = p.cache_key(ev.key)
            if ev.kind == "put" and self._valid(p, ev.key, ev.value):
                deletes.discard(target)
                puts[target] = ev.value
                p.keys[ev.key] = target
            elif p.keys.pop(ev.key, None) is not None:  # gone, or no longer valid
                puts.pop(target, None)
                deletes.add(target)
        await self.local.write_many(list(puts.items()), list(deletes))
        self.puts += len(puts)
        self.deletes += len(deletes)
        self._notify()

    async def delete_copy(self) -> None:
        """The remote was removed: its copy, canaries and cluster-config go."""
        if self._canaries is not None:
            self._canaries.cancel()
        for p in self.prefixes:
            await self.local.delete_prefix(p.cache)
            p.keys.clear()
        await self.local.delete_prefix(f"{SYNCED_PREFIX}/{self.name}/")
        await self.local.delete(f"{CLUSTER_CONFIG_PREFIX}/{self.name}")

    def stop(self) -> None:
        if self._canaries is not None:
            self._canaries.cancel()

    def summary(self) -> dict[str, Any]:
        st = self.status
        return {"name": self.name, "ready": st.ready, "connected": st.connected,
                "clusterID": st.cluster_id, "configError": st.config_error, "failures": st.failures,
                "lastFailure": st.last_failure, "invalidEntries": st.invalid_entries,
                "lastInvalid": st.last_invalid, "entries": self.entries(),
                "puts": self.puts, "deletes": self.deletes}


class _Remote:
    def __init__(self, writer: CacheWriter, task: asyncio.Task[None], digest: str) -> None:
        self.writer, self.task, self.digest = writer, task, digest


class KVStoreMesh:
    """Follows the clustermesh config directory and keeps one CacheWriter per remote."""

    def __init__(self, local: KvStore, cluster: str, cluster_id: int, config_dir: Path,
                 tick: float = 1.0) -> None:
        self.local = local
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.config_dir = config_dir
        self.tick = tick
        self.remotes: dict[str, _Remote] = {}
        self.config_errors: dict[str, str] = {}
        self._reads: dict[Path, FileRead] = {}
        self._closing: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        try:
            await follow_directory(self.config_dir, self._rescan, self.tick)
        finally:
            for r in self.remotes.values():
                r.task.cancel()
                r.writer.stop()
            await asyncio.gather(*(r.task for r in self.remotes.values()), return_exceptions=True)
            for r in self.remotes.values():
                await r.writer.kv.close()

    def _ids_in_use(self, asking: str) -> dict[int, str]:
        return {r.writer.status.cluster_id: n for n, r in self.remotes.items()
                if n != asking and r.writer.status.cluster_id is not None and r.writer.status.connected}

    def _rescan(self) -> None:
        try:
            self._scan()
        except Exception:  # the next change tries again; running remotes keep going
            log.exception("kvstoremesh: reading the config directory failed")

    def _scan(self) -> None:
        present = list_cluster_files(self.config_dir)
        for name in [n for n in self.remotes if n not in present]:
            self._spawn(self._remove(name))
        errors: dict[str, str] = {}
        for name, files in present.items():
            path, st = files[0]
            why = (f"{path}: {len(files)} files for cluster {name}; keep one of them" if len(files) > 1
                   else f"{path}: names the local cluster" if name == self.cluster else "")
            if not why:
                try:
                    check_cluster_name(name)
                except InvalidValue as e:
                    why = f"{path}: {e}"
            if why:
                errors[name] = why
                continue
            read = self._reads.get(path)
            if read is None or read.stamp != file_stamp(st):
                read = self._reads[path] = read_cluster_file(path, st)
            if read.config is None:
                errors[name] = read.error
                continue
            current = self.remotes.get(name)
            if current is not None and current.digest == read.digest:
                continue
            cfg = read.config
            try:
                kv = KvStore(cfg.endpoints, Tls(cfg.ca, cfg.cert_file, cfg.key_file) if cfg.ca else None,
                             timeout=cfg.timeout)
            except (KvError, OSError, ValueError) as e:
                errors[name] = f"{path}: {e}"
                continue
            self._connect(name, kv, read.digest)
        live = {p for files in present.values() for p, _ in files}
        self._reads = {p: r for p, r in self._reads.items() if p in live}
        for name, why in errors.items():
            if self.config_errors.get(name) != why:
                log.error("kvstoremesh: config for remote=%s rejected: %s", name, why)
        self.config_errors = errors

    def _connect(self, name: str, kv: KvStore, digest: str) -> None:
        current = self.remotes.get(name)
        if current is not None:  # changed file: reconnect; the copy stays until the relist
            current.task.cancel()
            current.writer.stop()
            self._spawn(current.writer.kv.close())
        writer = CacheWriter(name, kv, self.local, local_cluster=self.cluster, local_id=self.cluster_id,
                             ids_in_use=self._ids_in_use, on_ready=self._remote_became_ready)
        self.remotes[name] = _Remote(writer, asyncio.create_task(writer.run(), name=f"kvstoremesh-{name}"),
                                     digest)
        log.info("kvstoremesh: following remote=%s", name)

    def _remote_became_ready(self) -> None:
        if self.ready:
            freeze_built_state()  # what the watchers hold stays out of full garbage collections

    async def _remove(self, name: str) -> None:
        r = self.remotes.pop(name)
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        await r.writer.kv.close()
        try:
            await r.writer.delete_copy()
            log.info("kvstoremesh: remote=%s removed, its copy deleted", name)
        except KvError as e:  # left for the next start's relist to find stale
            log.error("kvstoremesh: deleting the copy of removed remote=%s failed: %s", name, e)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    @property
    def ready(self) -> bool:
        return all(r.writer.status.ready for r in self.remotes.values())

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: r.writer.summary() for n, r in sorted(self.remotes.items())}
        for name, why in self.config_errors.items():
            out.setdefault(name, {"name": name, "ready": False, "connected": False})["configError"] = why
        return {"cluster": self.cluster, "ready": self.ready, "clusters": out}

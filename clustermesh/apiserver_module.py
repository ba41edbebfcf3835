"""The clustermesh-apiserver's module: publish this cluster's state into its own etcd.

Built by the `plexus clustermesh-apiserver` program (plexus/clustermesh_apiserver.py), not
by the node agent. Its common config (`hive.agent`) names the cluster and its etcd; this
section tunes identity garbage collection and the heartbeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from clustermesh.apiserver import ApiServer
from clustermesh.kvstore import KvStore, Tls
from plexus.core.config import Strict
from plexus.core.module import Hive, Key, Module

APISERVER: Key[ApiServer] = Key("clustermesh-apiserver")


class ApiServerConfig(Strict):
    identity_gc_grace: float = Field(300.0, ge=0, description="Seconds an unused identity is kept.")
    identity_gc_interval: float = Field(30.0, gt=0, description="How often unused identities are looked for.")
    heartbeat_interval: float = Field(60.0, gt=0, description="How often the heartbeat key is refreshed.")


class ApiServerComponent:
    def __init__(self, hive: Hive, config: ApiServerConfig) -> None:
        common = hive.agent  # plexus.clustermesh_apiserver.ApiServerBase
        etcd = common.etcd
        tls = Tls(etcd.trusted_ca_file, etcd.cert_file, etcd.key_file) if etcd.trusted_ca_file else None
        self.hive = hive
        self.kv = KvStore(etcd.endpoints, tls)
        self.server = hive.provide(APISERVER, ApiServer(
            self.kv, common.cluster.name, common.cluster.id, gc_grace=config.identity_gc_grace,
            gc_interval=config.identity_gc_interval, heartbeat_interval=config.heartbeat_interval))
        hive.metrics.registry.register(_ApiServerCollector(self.server))

    async def start(self) -> None:
        self.hive.spawn("apiserver", self.server.run(), "run")

    async def stop(self) -> None:
        await self.hive.cancel_tasks("apiserver")
        await self.kv.close()

    def status(self) -> dict[str, Any]:
        return self.server.status()


class _ApiServerCollector(Collector):
    """The apiserver's counters, read at scrape time."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        s, c = self.server, self.server.counters
        ready = GaugeMetricFamily("plexus_clustermesh_apiserver_ready",
                                  "1 when this etcd session's initial sync is written.")
        ready.add_metric([], 1.0 if s.ready else 0.0)
        synced = GaugeMetricFamily("plexus_clustermesh_apiserver_source_synced",
                                   "1 when the source prefix is listed and watched.", labels=["source"])
        relists = CounterMetricFamily("plexus_clustermesh_apiserver_source_relists",
                                      "Lists of a source prefix (first, reconnect, compaction).",
                                      labels=["source"])
        for name, w in s.watches.items():
            synced.add_metric([name], 1.0 if w.status.synced else 0.0)
            relists.add_metric([name], float(w.status.relists))
        writes = CounterMetricFamily("plexus_clustermesh_apiserver_writes",
                                     "Keys written to etcd, by operation.", labels=["op"])
        writes.add_metric(["put"], float(c.puts))
        writes.add_metric(["delete"], float(c.deletes))
        published = GaugeMetricFamily("plexus_clustermesh_apiserver_published_entries",
                                      "Keys this apiserver holds published.")
        published.add_metric([], float(len(s.published)))
        identities = CounterMetricFamily("plexus_clustermesh_apiserver_identities_allocated",
                                         "Identities this apiserver created.")
        identities.add_metric([], float(s.allocator.allocated))
        errors = CounterMetricFamily("plexus_clustermesh_apiserver_etcd_errors",
                                     "Failed etcd sessions, heartbeats and identity collections.")
        errors.add_metric([], float(c.etcd_errors))
        yield from (ready, synced, relists, writes, published, identities, errors)


module = Module(name="apiserver", doc=__doc__ or "", config=ApiServerConfig,
                build=lambda hive, cfg: ApiServerComponent(hive, cfg))

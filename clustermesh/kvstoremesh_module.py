"""KVStoreMesh's module: every remote cluster copied into this cluster's own etcd.

Built by the `plexus kvstoremesh` program (plexus/kvstoremesh.py), not by the node agent.
Its common config (`hive.agent`) names the cluster, its etcd and the clustermesh config
directory; this section has what is particular to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from clustermesh.kvstore import KvStore, Tls
from clustermesh.kvstoremesh import KVStoreMesh
from plexus.core.config import Strict
from plexus.core.module import Hive, Key, Module

KVSTOREMESH: Key[KVStoreMesh] = Key("kvstoremesh")


class KVStoreMeshConfig(Strict):
    config_poll_interval: float = Field(1.0, gt=0, description=(
        "While the config dir is missing or cannot be watched: how often its stat is checked."))


class KVStoreMeshComponent:
    def __init__(self, hive: Hive, config: KVStoreMeshConfig) -> None:
        common = hive.agent  # plexus.kvstoremesh.KVStoreMeshBase
        etcd = common.etcd
        tls = Tls(etcd.trusted_ca_file, etcd.cert_file, etcd.key_file) if etcd.trusted_ca_file else None
        self.hive = hive
        self.kv = KvStore(etcd.endpoints, tls)
        self.mesh = hive.provide(KVSTOREMESH, KVStoreMesh(
            self.kv, common.cluster.name, common.cluster.id, common.config_dir,
            tick=config.config_poll_interval))
        hive.metrics.registry.register(_Collector(self.mesh))

    async def start(self) -> None:
        self.hive.spawn("kvstoremesh", self.mesh.run(), "run")

    async def stop(self) -> None:
        # Stop is not remove: the copies stay in etcd for the agents to read.
        await self.hive.cancel_tasks("kvstoremesh")
        await self.kv.close()

    def status(self) -> dict[str, Any]:
        return self.mesh.status()


class _Collector(Collector):
    """Per remote cluster, read at scrape time: no scan of any copy."""

    def __init__(self, mesh: KVStoreMesh) -> None:
        self.mesh = mesh

    def collect(self) -> Iterator[Any]:
        ready = GaugeMetricFamily("plexus_kvstoremesh_remote_ready",
                                  "1 when the cluster is copied and its canaries written.",
                                  labels=["target_cluster"])
        entries = GaugeMetricFamily("plexus_kvstoremesh_remote_entries",
                                    "Keys of the cluster held in the copy.", labels=["target_cluster"])
        failures = CounterMetricFamily("plexus_kvstoremesh_remote_failures",
                                       "Connection failures.", labels=["target_cluster"])
        invalid = CounterMetricFamily("plexus_kvstoremesh_remote_invalid_entries",
                                      "Values refused by validation, not copied.", labels=["target_cluster"])
        for name, r in list(self.mesh.remotes.items()):
            st = r.writer.status
            ready.add_metric([name], 1.0 if st.ready else 0.0)
            entries.add_metric([name], float(sum(r.writer.entries().values())))
            failures.add_metric([name], float(st.failures))
            invalid.add_metric([name], float(st.invalid_entries))
        yield from (ready, entries, failures, invalid)


module = Module(name="kvstoremesh", doc=__doc__ or "", config=KVStoreMeshConfig,
                build=lambda hive, cfg: KVStoreMeshComponent(hive, cfg))

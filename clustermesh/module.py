"""ClusterMesh: the merged tables of every connected cluster."""

from __future__ import annotations

from typing import Any

from clustermesh.config import ClusterMeshConfig
from clustermesh.tables import (
    GLOBAL_SERVICES,
    IDENTITIES,
    IPCACHE,
    MANIFESTS,
    NODE_ATTRIBUTES,
    NODES,
    SERVICES,
    global_services_table,
    identities_table,
    ipcache_table,
    manifests_table,
    node_attributes_table,
    nodes_table,
    services_table,
)
from plexus.core.module import Hive, Module


class ClusterMesh:
    def __init__(self, hive: Hive, config: ClusterMeshConfig) -> None:
        self.config = config
        self.nodes = hive.provide(NODES, nodes_table())
        self.ipcache = hive.provide(IPCACHE, ipcache_table())
        self.identities = hive.provide(IDENTITIES, identities_table())
        self.services = hive.provide(SERVICES, services_table())
        self.global_services = hive.provide(GLOBAL_SERVICES, global_services_table())
        self.node_attributes = hive.provide(NODE_ATTRIBUTES, node_attributes_table())
        self.manifests = hive.provide(MANIFESTS, manifests_table())

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"nodes": len(self.nodes), "endpoints": len(self.ipcache),
                "identities": len(self.identities), "services": len(self.services)}


module = Module(name="clustermesh", doc=__doc__ or "", config=ClusterMeshConfig,
                build=lambda hive, cfg: ClusterMesh(hive, cfg))

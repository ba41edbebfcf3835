"""The bpf module over fresh in-memory tables, no datapath loaded: for tests and benchmarks
of derivation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpf.config import BpfConfig
from bpf.module import BpfDatapath
from clustermesh.tables import (
    IDENTITIES,
    IPCACHE,
    NODES,
    SERVICES,
    identities_table,
    ipcache_table,
    nodes_table,
    services_table,
)
from plexus.core.manifests import MANIFESTS, manifests_table
from plexus.core.module import Hive
from plexus.core.node import ENDPOINTS, LOCAL_NODE, LocalNode, endpoints_table
from plexus.core.tables import Table


def bpf_module(state_dir: Path, local: LocalNode, config: BpfConfig | None = None
               ) -> tuple[BpfDatapath, dict[str, Table[Any, Any]]]:
    """The module and its source tables by name: endpoints, ipcache, identities, manifests, nodes."""
    hive = Hive(agent=None, state_dir=state_dir)
    hive.provide(LOCAL_NODE, local)
    tables: dict[str, Table[Any, Any]] = {
        "endpoints": hive.provide(ENDPOINTS, endpoints_table()),
        "ipcache": hive.provide(IPCACHE, ipcache_table()),
        "identities": hive.provide(IDENTITIES, identities_table()),
        "manifests": hive.provide(MANIFESTS, manifests_table()),
        "nodes": hive.provide(NODES, nodes_table())}
    hive.provide(SERVICES, services_table())  # the service load-balancer's, unused here
    return BpfDatapath(hive, config or BpfConfig()), tables

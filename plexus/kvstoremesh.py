"""The kvstoremesh program: built like the clustermesh-apiserver, from its own module list.

One per cluster, next to its etcd and apiserver. Serves its local API (`/v1/status`,
`/v1/healthz`) on a unix socket and `/metrics` and `/healthz` on TCP, runs until SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from clustermesh.config import EtcdSection
from clustermesh.kvstoremesh_module import KVSTOREMESH
from clustermesh.kvstoremesh_module import module as kvstoremesh
from plexus.agent import ClusterSection, MetricsSection
from plexus.core import log as plog
from plexus.core.api import ApiServer
from plexus.core.config import Strict, parse
from plexus.core.module import App, Hive, Module
from plexus.core.serve import serve_until_signalled

DEFAULT_API_SOCKET = Path("/run/plexus/kvstoremesh.sock")
DEFAULT_METRICS_PORT = 9964
DEFAULT_STATE_DIR = Path("/var/lib/plexus/kvstoremesh")
DEFAULT_CONFIG_DIR = Path("/var/lib/plexus/clustermesh")

MODULES: list[Module[Any]] = [
    kvstoremesh,
]


class KVStoreMeshBase(Strict):
    cluster: ClusterSection
    etcd: EtcdSection
    config_dir: Path = Field(DEFAULT_CONFIG_DIR, description="One file per remote cluster, as the agent's.")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Nothing is kept there today.")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    metrics: MetricsSection = Field(
        default_factory=lambda: MetricsSection.model_validate({"port": DEFAULT_METRICS_PORT}))
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")


def config_model(modules: list[Module[Any]]) -> type[KVStoreMeshBase]:
    sections: dict[str, Any] = {m.name: (m.config, Field(default_factory=m.config)) for m in modules}
    return create_model("KVStoreMeshConfig", __base__=KVStoreMeshBase, **sections)


def load_config(raw: dict[str, Any], modules: list[Module[Any]]) -> KVStoreMeshBase:
    return parse(config_model(modules), raw, "kvstoremesh")


def build(config: KVStoreMeshBase, modules: list[Module[Any]]) -> App:
    hive = Hive(agent=config, state_dir=config.state_dir)
    return App(hive, modules, {m.name: getattr(config, m.name) for m in modules})


async def healthz(app: App) -> dict[str, Any]:
    """Healthy when no module task crashed and every remote known is copied."""
    mesh = app.hive.require(KVSTOREMESH)
    ok = all(h == "ok" for h in app.hive.health.values()) and mesh.ready
    return {"ok": ok, "ready": mesh.ready, "health": dict(app.hive.health)}


def add_core_routes(app: App) -> None:
    cfg: KVStoreMeshBase = app.hive.agent

    async def status(_q: dict[str, str], _b: Any) -> Any:
        return {"cluster": cfg.cluster.name, "clusterID": cfg.cluster.id, "pid": os.getpid(),
                "modules": app.status()}

    async def health(_q: dict[str, str], _b: Any) -> Any:
        return await healthz(app)

    app.hive.routes.get("/v1/status", status)
    app.hive.routes.get("/v1/healthz", health)


async def run(config: KVStoreMeshBase) -> int:
    plog.setup(config.log_level, prefix=f"kvstoremesh/{config.cluster.name}")
    app = build(config, MODULES)
    add_core_routes(app)
    cfg = config
    server = ApiServer(app.hive.routes, cfg.api_socket, app.hive.metrics.registry,
                       cfg.metrics.address, cfg.metrics.port, healthz=lambda: healthz(app))
    await serve_until_signalled(
        app, server, f"kvstoremesh ready cluster={config.cluster.name} config={config.config_dir} "
                     f"api={config.api_socket} metrics={config.metrics.address}:{config.metrics.port}")
    return 0

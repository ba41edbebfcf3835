"""The clustermesh-apiserver program: built like the agent, from its own module list.

One per cluster, next to its etcd. Serves its local API (`/v1/status`, `/v1/healthz`) on a
unix socket and `/metrics` and `/healthz` on TCP, runs until SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from clustermesh.apiserver_module import APISERVER
from clustermesh.apiserver_module import module as apiserver
from clustermesh.config import EtcdSection
from clustermesh.vm_signer import module as vmsigner
from plexus.agent import ClusterSection, MetricsSection
from plexus.core import log as plog
from plexus.core.api import ApiServer
from plexus.core.config import Strict, parse
from plexus.core.module import App, Hive, Module
from plexus.core.serve import serve_until_signalled

DEFAULT_API_SOCKET = Path("/run/plexus/clustermesh-apiserver.sock")
DEFAULT_METRICS_PORT = 9963
DEFAULT_STATE_DIR = Path("/var/lib/plexus/clustermesh-apiserver")

MODULES: list[Module[Any]] = [
    apiserver,
    vmsigner,
]


class ApiServerBase(Strict):
    cluster: ClusterSection
    etcd: EtcdSection
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Nothing is kept there today.")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    metrics: MetricsSection = Field(
        default_factory=lambda: MetricsSection.model_validate({"port": DEFAULT_METRICS_PORT}))
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")


def config_model(modules: list[Module[Any]]) -> type[ApiServerBase]:
    """The program's config: common sections plus one optional section per module."""
    sections: dict[str, Any] = {m.name: (m.config, Field(default_factory=m.config)) for m in modules}
    return create_model("ClusterMeshApiServerConfig", __base__=ApiServerBase, **sections)


def load_config(raw: dict[str, Any], modules: list[Module[Any]]) -> ApiServerBase:
    return parse(config_model(modules), raw, "clustermesh-apiserver")


def build(config: ApiServerBase, modules: list[Module[Any]]) -> App:
    hive = Hive(agent=config, state_dir=config.state_dir)
    return App(hive, modules, {m.name: getattr(config, m.name) for m in modules})


async def healthz(app: App) -> dict[str, Any]:
    """Healthy when no module task crashed and this etcd session's initial sync is written."""
    server = app.hive.require(APISERVER)
    ok = all(h == "ok" for h in app.hive.health.values()) and server.ready
    return {"ok": ok, "ready": server.ready, "health": dict(app.hive.health),
            "lastError": server.counters.last_error}


def add_core_routes(app: App) -> None:
    cfg: ApiServerBase = app.hive.agent

    async def status(_q: dict[str, str], _b: Any) -> Any:
        return {"cluster": cfg.cluster.name, "clusterID": cfg.cluster.id, "pid": os.getpid(),
                "modules": app.status()}

    async def health(_q: dict[str, str], _b: Any) -> Any:
        return await healthz(app)

    app.hive.routes.get("/v1/status", status)
    app.hive.routes.get("/v1/healthz", health)


def server_for(app: App) -> ApiServer:
    cfg: ApiServerBase = app.hive.agent
    return ApiServer(app.hive.routes, cfg.api_socket, app.hive.metrics.registry,
                     cfg.metrics.address, cfg.metrics.port, healthz=lambda: healthz(app))


async def run(config: ApiServerBase) -> int:
    plog.setup(config.log_level, prefix=f"apiserver/{config.cluster.name}")
    app = build(config, MODULES)
    add_core_routes(app)
    server = server_for(app)
    await serve_until_signalled(
        app, server, f"clustermesh-apiserver ready cluster={config.cluster.name} "
                     f"api={config.api_socket} metrics={config.metrics.address}:{config.metrics.port}")
    return 0

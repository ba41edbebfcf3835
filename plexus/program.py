"""What the programs next to a cluster's etcd share (the clustermesh-apiserver and
kvstoremesh): their common config sections, how one is built from its module list, its core
routes (`/v1/status`, `/v1/healthz`) and serving until SIGTERM."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, create_model

from clustermesh.config import EtcdSection
from plexus.agent import ClusterSection, MetricsSection
from plexus.core import log as plog
from plexus.core.api import ApiServer
from plexus.core.config import Strict, parse
from plexus.core.module import App, Hive, Module
from plexus.core.serve import serve_until_signalled

Healthz = Callable[[App], Awaitable[dict[str, Any]]]


class ProgramBase(Strict):
    """Each program sets its own defaults for the paths and the metrics port."""

    cluster: ClusterSection
    etcd: EtcdSection
    state_dir: Path
    api_socket: Path
    metrics: MetricsSection
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")


B = TypeVar("B", bound=ProgramBase)


def load_config(base: type[B], raw: dict[str, Any], modules: list[Module[Any]], program: str) -> B:
    """The program's config: its common sections plus one optional section per module."""
    sections: dict[str, Any] = {m.name: (m.config, Field(default_factory=m.config)) for m in modules}
    model = create_model(f"{base.__name__}Config", __base__=base, **sections)
    config: B = parse(model, raw, program)
    return config


def build(config: ProgramBase, modules: list[Module[Any]]) -> App:
    hive = Hive(agent=config, state_dir=config.state_dir)
    return App(hive, modules, {m.name: getattr(config, m.name) for m in modules})


async def run(config: ProgramBase, modules: list[Module[Any]], log_name: str, healthz: Healthz,
              ready: str) -> int:
    """Build, add the core routes, serve the API and `/metrics` until SIGTERM; `ready` begins
    the line logged once serving."""
    plog.setup(config.log_level, prefix=f"{log_name}/{config.cluster.name}")
    app = build(config, modules)

    async def status(_q: dict[str, str], _b: Any) -> Any:
        return {"cluster": config.cluster.name, "clusterID": config.cluster.id, "pid": os.getpid(),
                "modules": app.status()}

    async def health(_q: dict[str, str], _b: Any) -> Any:
        return await healthz(app)

    app.hive.routes.get("/v1/status", status)
    app.hive.routes.get("/v1/healthz", health)
    server = ApiServer(app.hive.routes, config.api_socket, app.hive.metrics.registry,
                       config.metrics.address, config.metrics.port, healthz=lambda: healthz(app))
    await serve_until_signalled(
        app, server, f"{ready} api={config.api_socket} "
                     f"metrics={config.metrics.address}:{config.metrics.port}")
    return 0

"""The clustermesh-apiserver program: built like the agent, from its own module list.

One per cluster, next to its etcd. Serves its local API (`/v1/status`, `/v1/healthz`) on a
unix socket and `/metrics` and `/healthz` on TCP, runs until SIGTERM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from clustermesh.apiserver_module import APISERVER
from clustermesh.apiserver_module import module as apiserver
from clustermesh.vm_signer import module as vmsigner
from egress.controlplane import module as egress_health
from plexus import program
from plexus.agent import MetricsSection
from plexus.core.module import App, Module
from plexus.program import ProgramBase

DEFAULT_API_SOCKET = Path("/run/plexus/clustermesh-apiserver.sock")
DEFAULT_METRICS_PORT = 9963
DEFAULT_STATE_DIR = Path("/var/lib/plexus/clustermesh-apiserver")

MODULES: list[Module[Any]] = [
    apiserver,
    vmsigner,
    egress_health,
]


class ApiServerBase(ProgramBase):
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Nothing is kept there today.")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    metrics: MetricsSection = Field(
        default_factory=lambda: MetricsSection.model_validate({"port": DEFAULT_METRICS_PORT}))


def load_config(raw: dict[str, Any], modules: list[Module[Any]]) -> ApiServerBase:
    return program.load_config(ApiServerBase, raw, modules, "clustermesh-apiserver")


build = program.build


async def healthz(app: App) -> dict[str, Any]:
    """Healthy when no module task crashed and this etcd session's initial sync is written."""
    server = app.hive.require(APISERVER)
    ok = all(h == "ok" for h in app.hive.health.values()) and server.ready
    return {"ok": ok, "ready": server.ready, "health": dict(app.hive.health),
            "lastError": server.counters.last_error}


async def run(config: ApiServerBase) -> int:
    return await program.run(config, MODULES, "apiserver", healthz,
                             f"clustermesh-apiserver ready cluster={config.cluster.name}")

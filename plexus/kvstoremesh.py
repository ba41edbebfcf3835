"""The kvstoremesh program: built like the clustermesh-apiserver, from its own module list.

One per cluster, next to its etcd and apiserver. Serves its local API (`/v1/status`,
`/v1/healthz`) on a unix socket and `/metrics` and `/healthz` on TCP, runs until SIGTERM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from clustermesh.kvstoremesh_module import KVSTOREMESH
from clustermesh.kvstoremesh_module import module as kvstoremesh
from plexus import program
from plexus.agent import MetricsSection
from plexus.core.module import App, Module
from plexus.program import ProgramBase

DEFAULT_API_SOCKET = Path("/run/plexus/kvstoremesh.sock")
DEFAULT_METRICS_PORT = 9964
DEFAULT_STATE_DIR = Path("/var/lib/plexus/kvstoremesh")
DEFAULT_CONFIG_DIR = Path("/var/lib/plexus/clustermesh")

MODULES: list[Module[Any]] = [
    kvstoremesh,
]


class KVStoreMeshBase(ProgramBase):
    config_dir: Path = Field(DEFAULT_CONFIG_DIR, description="One file per remote cluster, as the agent's.")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Nothing is kept there today.")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    metrics: MetricsSection = Field(
        default_factory=lambda: MetricsSection.model_validate({"port": DEFAULT_METRICS_PORT}))


def load_config(raw: dict[str, Any], modules: list[Module[Any]]) -> KVStoreMeshBase:
    return program.load_config(KVStoreMeshBase, raw, modules, "kvstoremesh")


build = program.build


async def healthz(app: App) -> dict[str, Any]:
    """Healthy when no module task crashed and every remote known is copied."""
    mesh = app.hive.require(KVSTOREMESH)
    ok = all(h == "ok" for h in app.hive.health.values()) and mesh.ready
    return {"ok": ok, "ready": mesh.ready, "health": dict(app.hive.health)}


async def run(config: KVStoreMeshBase) -> int:
    return await program.run(config, MODULES, "kvstoremesh", healthz,
                             f"kvstoremesh ready cluster={config.cluster.name} config={config.config_dir}")

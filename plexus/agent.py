"""The node agent: load config, build every module, serve the local API, run until SIGTERM."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, create_model, field_validator

from clustermesh.models import InvalidValue, check_cluster_id, check_cluster_name
from plexus.core import log as plog
from plexus.core.api import ApiServer
from plexus.core.config import ConfigError, Strict, parse, read_yaml
from plexus.core.module import App, Hive, Module
from plexus.core.serve import serve_until_signalled

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/plexus")
DEFAULT_API_SOCKET = Path("/run/plexus/agent.sock")

C = TypeVar("C", bound=Strict)


class ClusterSection(Strict):
    name: str = Field(description="This cluster's name (lower-case, at most 32 characters).")
    id: int = Field(description="This cluster's ID, 1..255; scopes its identities.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_cluster_name(v)
        except InvalidValue as e:
            raise ValueError(str(e)) from None

    @field_validator("id")
    @classmethod
    def _id(cls, v: int) -> int:
        try:
            return check_cluster_id(v)
        except InvalidValue as e:
            raise ValueError(str(e)) from None


class NodeSection(Strict):
    name: str = Field(description="This node's name, unique in its cluster.")
    ip: ipaddress.IPv4Address = Field(description="The node's underlay address.")
    pod_cidr: ipaddress.IPv4Network = Field(alias="podCIDR", description="The node's pod CIDR (IPAM range).")
    pod_cidr_v6: ipaddress.IPv6Network | None = Field(None, alias="podCIDRv6",
                                                      description="Optional IPv6 pod CIDR.")
    labels: dict[str, str] = Field(default_factory=dict, description="Node labels.")
    mtu: int = Field(1500, ge=1280, le=9000, description="Underlay MTU.")


class MetricsSection(Strict):
    address: str = Field("127.0.0.1", description="Where /metrics listens.")
    port: int | None = Field(9962, ge=1, le=65535, description="Port for /metrics; null disables.")


class AgentBase(Strict):
    cluster: ClusterSection
    node: NodeSection
    state_dir: Path = Field(DEFAULT_STATE_DIR,
                            description="Persistent state (IPAM, keys, endpoints).")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")

    def section(self, module: Module[C]) -> C:
        """One module's config: a field that config_model adds, so typed through its Module."""
        value = getattr(self, module.name)
        if not isinstance(value, module.config):
            raise TypeError(f"config section {module.name!r} is not a {module.config.__name__}")
        return value


def config_model(modules: list[Module[Any]]) -> type[AgentBase]:
    """The agent config: common sections plus one optional section per module."""
    clash = {m.name for m in modules} & set(AgentBase.model_fields)
    if clash:
        raise RuntimeError(f"module names clash with common config sections: {sorted(clash)}")
    sections: dict[str, Any] = {m.name: (m.config, Field(default_factory=m.config)) for m in modules}
    return create_model("AgentConfig", __base__=AgentBase, **sections)


def load_config(path: str | Path, modules: list[Module[Any]]) -> AgentBase:
    return parse(config_model(modules), read_yaml(path), str(path))


def build(config: AgentBase, modules: list[Module[Any]]) -> App:
    hive = Hive(agent=config, state_dir=config.state_dir)
    configs = {m.name: getattr(config, m.name) for m in modules}
    return App(hive, modules, configs)


def add_core_routes(app: App) -> None:
    cfg: AgentBase = app.hive.agent

    async def status(_q: dict[str, str], _b: Any) -> Any:
        return {"cluster": cfg.cluster.name, "clusterID": cfg.cluster.id, "node": cfg.node.name,
                "pid": os.getpid(), "modules": app.status()}

    app.hive.routes.get("/v1/status", status)

    async def healthz(_q: dict[str, str], _b: Any) -> Any:
        # objects in error make a module "degraded", not the agent unhealthy (App.health)
        return app.health()

    app.hive.routes.get("/v1/healthz", healthz)


async def run(config_path: str | Path, modules: list[Module[Any]] | None = None) -> int:
    """Run the agent of `modules` (default: a node's, `plexus.app.MODULES`)."""
    from plexus.app import MODULES

    modules = MODULES if modules is None else modules
    try:
        config = load_config(config_path, modules)
    except ConfigError as e:
        logging.getLogger("plexus.agent").error("invalid config:\n%s", e)
        return 2
    plog.setup(config.log_level, prefix=f"{config.cluster.name}/{config.node.name}")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    app = build(config, modules)
    add_core_routes(app)
    server = ApiServer(app.hive.routes, config.api_socket, app.hive.metrics.registry,
                       config.metrics.address, config.metrics.port)
    await serve_until_signalled(
        app, server, f"agent ready cluster={config.cluster.name} node={config.node.name} "
                     f"api={config.api_socket}",
        "agent stopping (kernel and BGP state stay in place)")
    return 0

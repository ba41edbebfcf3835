"""The relay program: built like the agent from a module list (one: the relay).

Serves the same routes on its unix socket (`plexus relay status`, `plexus observe --relay`)
and on TCP at `listen` (the web page, its flows and status), `/metrics` on its own port,
until SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from plexus.core import log as plog
from plexus.core.api import ApiServer, TcpServer
from plexus.core.config import load
from plexus.core.module import App, Hive, Module
from plexus.core.serve import serve_until_signalled
from plexus.relay.config import RelayConfig
from plexus.relay.module import RELAY
from plexus.relay.module import module as relay

MODULES: list[Module[Any]] = [relay]
WEB = Path(__file__).parent / "web"


def build(config: RelayConfig) -> App:
    hive = Hive(agent=config, state_dir=config.api_socket.parent)
    app = App(hive, MODULES, {"relay": config.relay})

    async def status(_q: dict[str, str], _b: Any) -> Any:
        return {"cluster": config.cluster.name, "pid": os.getpid(), "modules": app.status()}

    hive.routes.get("/v1/status", status)
    hive.routes.static("/", WEB)
    return app


def load_config(path: Path) -> RelayConfig:
    return load(RelayConfig, path)


async def run(config: RelayConfig) -> int:
    plog.setup(config.log_level, prefix=f"relay/{config.cluster.name}")
    app = build(config)
    web = TcpServer(app.hive.routes, config.listen.address, config.listen.port)
    server = ApiServer(app.hive.routes, config.api_socket, app.hive.metrics.registry,
                       config.metrics.address, config.metrics.port)
    await web.start()
    app.hive.require(RELAY).listen = {"address": config.listen.address, "port": web.port}
    try:
        await serve_until_signalled(
            app, server, f"relay ready cluster={config.cluster.name} api={config.api_socket} "
                         f"web=http://{config.listen.address}:{web.port}/")
    finally:
        await web.stop()
    return 0

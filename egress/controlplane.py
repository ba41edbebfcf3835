"""Gateway health from the control plane: the clustermesh-apiserver probes every node its
cluster registered (ICMP, like a source node's prober, slower by default) and adds why it
cannot reach one to that node's published record (`egress.plexus.io/control-plane-unreachable`).
Every cluster follows node records already, so a source node of any cluster that has no
verdict of its own yet (it just started, or the gateway is new to it) follows this one, and
`plexus egress list` shows it.

Built by the clustermesh-apiserver program, not by the node agent. The annotation is taken
back as soon as the node answers, or when the node is no longer registered.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from clustermesh.apiserver import ApiServer
from clustermesh.apiserver_module import APISERVER
from clustermesh.tables import NodeKey
from egress.probe import GatewayProber
from egress.tables import ANNOTATION_CONTROL_PLANE, CONTROL_PLANE, health_table, node_name
from plexus.core.config import Strict
from plexus.core.module import Hive, Module

log = logging.getLogger(__name__)


class ControlPlaneHealthConfig(Strict):
    probe: bool = Field(True, description="Probe this cluster's nodes for the egress gateways "
                                          "of every cluster.")
    probe_interval: float = Field(0.5, gt=0.0, le=60.0,
                                  description="Seconds between two probes of one node.")
    probe_threshold: int = Field(
        3, ge=1, le=100, description="Probes in a row without an answer that make a node "
                                     "unreachable (detection within interval x (threshold + 1)).")


class ControlPlaneHealth:
    def __init__(self, hive: Hive, config: ControlPlaneHealthConfig) -> None:
        self.hive = hive
        self.config = config
        self.server: ApiServer = hive.require(APISERVER)
        self.health = health_table()
        self.prober = GatewayProber(CONTROL_PLANE, self.health, hive.clock, self.targets,
                                    config.probe_interval, config.probe_threshold)
        self.annotated: set[NodeKey] = set()

    def targets(self) -> dict[NodeKey, str]:
        out = {}
        for n in self.server.registered_nodes():
            if (ip := n.internal_ip()) is not None:
                out[(self.server.cluster, n.name)] = ip
        return out

    async def start(self) -> None:
        if self.config.probe:
            self.hive.spawn("egress", self.prober.run(), "probe")
            self.hive.spawn("egress", self._publish(), "publish")

    async def _publish(self) -> None:
        async for keys in self.health.watch():
            for key in keys:
                h = self.health.get(key)
                node = key[1]
                why = h.reason if h is not None and not h.healthy else None
                if why is None and node not in self.annotated:
                    continue
                self.server.annotate_node(node[1], ANNOTATION_CONTROL_PLANE, why)
                (self.annotated.add if why else self.annotated.discard)(node)

    async def stop(self) -> None:
        await self.hive.cancel_tasks("egress")

    def status(self) -> dict[str, Any]:
        return {"probing": sorted(node_name(k) for k in self.prober.state),
                "unreachable": {node_name(h.gateway): h.reason for h in self.health
                                if not h.healthy}}


module = Module(name="egress", doc=__doc__ or "", config=ControlPlaneHealthConfig,
                build=lambda hive, cfg: ControlPlaneHealth(hive, cfg))

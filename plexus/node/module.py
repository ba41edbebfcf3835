"""The local node and its endpoints: what the CNI plugin registers with the agent."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from plexus.core.api import ApiError
from plexus.core.config import Strict
from plexus.core.module import Hive, Module
from plexus.core.node import (
    ENDPOINTS,
    LOCAL_NODE,
    NODE_ATTRIBUTES,
    POD_MTU,
    Endpoint,
    LocalNode,
    NodeAttributes,
    endpoints_table,
)
from plexus.core.tables import Table
from plexus.core.tunnels import node_tunnels

log = logging.getLogger(__name__)


class NodeConfig(Strict):
    """Settings of the endpoint manager."""

    persist: bool = Field(True, description="Keep endpoints in the state dir across restarts.")


class EndpointManager:
    def __init__(self, hive: Hive, config: NodeConfig) -> None:
        agent = hive.agent
        self.local = hive.provide(LOCAL_NODE, LocalNode(
            cluster=agent.cluster.name, cluster_id=agent.cluster.id, name=agent.node.name,
            ip=str(agent.node.ip), pod_cidr=str(agent.node.pod_cidr),
            pod_cidr_v6=str(agent.node.pod_cidr_v6) if agent.node.pod_cidr_v6 else None,
            labels=dict(agent.node.labels)))
        self.table: Table[str, Endpoint] = hive.provide(ENDPOINTS, endpoints_table())
        self.attributes = hive.provide(NODE_ATTRIBUTES, NodeAttributes())
        self.tunnels = node_tunnels(hive)
        self.path: Path = hive.state_dir / "endpoints.json"
        self.config = config
        self.hive = hive
        self.mtu: int = agent.node.mtu
        self.state_dir: Path = hive.state_dir
        hive.routes.get("/v1/node", self._node)
        hive.routes.get("/v1/endpoints", self._list)
        hive.routes.post("/v1/endpoints", self._add)
        hive.routes.delete("/v1/endpoints/{id}", self._delete)

    async def start(self) -> None:
        if self.config.persist and self.path.exists():
            try:
                for raw in json.loads(self.path.read_text()):
                    self.table.upsert(Endpoint(**raw))
                log.info("restored %d endpoints from %s", len(self.table), self.path)
            except (ValueError, TypeError) as e:
                log.error("cannot restore endpoints from %s: %s (starting empty)", self.path, e)

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"endpoints": len(self.table), "podCIDR": self.local.pod_cidr}

    def _save(self) -> None:
        if not self.config.persist:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([e.__dict__ for e in self.table.all()], indent=1))
        os.replace(tmp, self.path)

    async def _node(self, _q: dict[str, str], _b: Any) -> Any:
        # A feature that wraps pod traffic (WireGuard) lowers the pod MTU so it never fragments;
        # a tunnel between nodes (inside it, when on) takes its overhead off that.
        pod_mtu = self.attributes.get(POD_MTU)
        mtu = min(self.mtu, pod_mtu) if pod_mtu is not None else self.mtu
        mtu -= max((t.overhead for t in self.tunnels), default=0)
        return {**self.local.__dict__, "mtu": mtu, "stateDir": str(self.state_dir)}

    async def _list(self, _q: dict[str, str], _b: Any) -> Any:
        return [e.__dict__ for e in self.table.all()]

    async def _add(self, _q: dict[str, str], body: Any) -> Any:
        if not isinstance(body, dict):
            raise ApiError(400, "endpoint must be a JSON object")
        try:
            ep = Endpoint(
                container_id=_str(body, "container_id"), ip=_str(body, "ip"),
                namespace=_str(body, "namespace"), pod_name=_str(body, "pod_name"),
                labels=_labels(body.get("labels", {})), host_ifname=_str(body, "host_ifname"),
                netns=str(body.get("netns", "")), ifname=str(body.get("ifname", "eth0")),
                ipv6=body.get("ipv6"))
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        self.table.upsert(ep)
        self._save()
        log.info("endpoint registered id=%s ip=%s pod=%s/%s", ep.container_id, ep.ip,
                 ep.namespace, ep.pod_name)
        return ep.__dict__

    async def _delete(self, q: dict[str, str], _b: Any) -> Any:
        gone = self.table.delete(q["id"])
        if gone is not None:
            self._save()
            log.info("endpoint removed id=%s ip=%s", gone.container_id, gone.ip)
        return {"deleted": gone is not None}


def _str(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not v:
        raise ValueError(f"field {name} must be a non-empty string")
    if any(ord(c) < 0x20 for c in v):
        raise ValueError(f"field {name} contains control characters")
    return v


def _labels(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("field labels must be a map of strings")
    return dict(v)


module = Module(name="endpoints", doc=__doc__ or "", config=NodeConfig,
                build=lambda hive, cfg: EndpointManager(hive, cfg))

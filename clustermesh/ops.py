"""What ClusterMesh changes outside the agent: its registrations in etcd, direct routes."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from clustermesh.kvstore import KvError, KvStore
from clustermesh.models import (
    REGISTRATIONS_PREFIX,
    EndpointRegistration,
    Node,
    endpoint_registration_key,
    node_registration_key,
)
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.node import Endpoint
from plexus.core.reconciler import TemporaryError

RTPROT_PLEXUS = 190  # marks the routes this agent owns, so prune touches no other
RT_TABLE_MAIN = 254


class NodeRegistrationOps:
    """This node's record, for the apiserver to publish."""

    def __init__(self, kv: KvStore) -> None:
        self.kv = kv

    async def update(self, node: Node) -> None:
        try:
            await self.kv.put(node_registration_key(node.cluster, node.name), node.to_json())
        except KvError as e:
            raise TemporaryError(str(e)) from None

    async def delete(self, node: Node) -> None:
        try:
            await self.kv.delete(node_registration_key(node.cluster, node.name))
        except KvError as e:
            raise TemporaryError(str(e)) from None

    async def prune(self, rows: Iterable[Node]) -> None:
        pass  # one key per node, owned by update/delete


class EndpointRegistrationOps:
    """This node's endpoints, one key each."""

    def __init__(self, kv: KvStore, cluster: str, node: str, host_ip: str) -> None:
        self.kv = kv
        self.cluster = cluster
        self.node = node
        self.host_ip = host_ip

    def _key(self, ep: Endpoint) -> str:
        return endpoint_registration_key(self.cluster, self.node, ep.container_id)

    async def update(self, ep: Endpoint) -> None:
        reg = EndpointRegistration(ip=ep.ip, namespace=ep.namespace, pod_name=ep.pod_name,
                                   labels=dict(ep.labels), node=self.node, host_ip=self.host_ip,
                                   ipv6=ep.ipv6)
        try:
            await self.kv.put(self._key(ep), reg.to_json())
        except KvError as e:
            raise TemporaryError(str(e)) from None

    async def delete(self, ep: Endpoint) -> None:
        try:
            await self.kv.delete(self._key(ep))
        except KvError as e:
            raise TemporaryError(str(e)) from None

    async def prune(self, rows: Iterable[Endpoint]) -> None:
        prefix = f"{REGISTRATIONS_PREFIX}/{self.cluster}/endpoints/{self.node}/"
        keep = {self._key(ep) for ep in rows}
        items, _ = await self.kv.list_prefix(prefix)
        for item in items:
            if item.key not in keep:
                await self.kv.delete(item.key)


@dataclass(frozen=True)
class DirectRoute:
    """A pod CIDR of another node of this cluster, reached through that node's IP."""

    dst: str
    via: str

    @property
    def key(self) -> str:
        return self.dst


class RouteOps:
    """Routes in the main table, marked with our protocol number."""

    def __init__(self, netlink: Netlink = AGENT_NETNS) -> None:
        self.netlink = netlink

    def _sync_update(self, row: DirectRoute) -> None:
        with self.netlink.route() as ipr:
            # Only a node on a shared segment is a direct next hop.
            try:
                found = ipr.route("get", dst=row.via)
            except NetlinkError as e:  # ENETUNREACH: no route to the node at all
                raise TemporaryError(f"no route to node {row.via}: {e}", delay=30) from None
            if not found or found[0].get_attr("RTA_GATEWAY"):
                raise TemporaryError(f"node {row.via} is not on a directly connected segment",
                                     delay=30)
            ipr.route("replace", dst=row.dst, gateway=row.via, proto=RTPROT_PLEXUS,
                      table=RT_TABLE_MAIN)

    def _sync_delete(self, row: DirectRoute) -> None:
        with self.netlink.route() as ipr:
            try:
                ipr.route("del", dst=row.dst, proto=RTPROT_PLEXUS, table=RT_TABLE_MAIN)
            except NetlinkError as e:
                if e.code != 3:  # ESRCH: already gone
                    raise

    def _sync_prune(self, rows: list[DirectRoute]) -> None:
        keep = {ipaddress.ip_network(r.dst) for r in rows}
        with self.netlink.route() as ipr:
            # only the main table: other features keep their routes in tables of their own
            for r in list(ipr.get_routes(family=2, proto=RTPROT_PLEXUS, table=RT_TABLE_MAIN)):
                dst = r.get_attr("RTA_DST")
                if dst is None or r.get_attr("RTA_TABLE") != RT_TABLE_MAIN:
                    continue
                net = ipaddress.ip_network(f"{dst}/{r['dst_len']}")
                if net not in keep:
                    ipr.route("del", dst=str(net), proto=RTPROT_PLEXUS, table=RT_TABLE_MAIN,
                              scope=r["scope"])

    async def update(self, row: DirectRoute) -> None:
        await asyncio.to_thread(self._sync_update, row)

    async def delete(self, row: DirectRoute) -> None:
        await asyncio.to_thread(self._sync_delete, row)

    async def prune(self, rows: Iterable[DirectRoute]) -> None:
        await asyncio.to_thread(self._sync_prune, list(rows))

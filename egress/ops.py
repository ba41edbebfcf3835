"""Reconciler targets of the egress datapath: the steering and translation maps (through
`bpf.egress`), and the node's tunnel device with the gateway NAT on its uplink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bpf import attach
from bpf.egress import TUNNEL_MAC, EgressMaps, SnatEntry, SteeringEntry
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.reconciler import TemporaryError

VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
EEXIST, ENOENT, ENODEV = 17, 2, 19


class SteeringOps:
    """egress_policy on a source node: where each local selected pod's traffic goes."""

    def __init__(self, maps: EgressMaps) -> None:
        self.maps = maps

    async def update(self, row: SteeringEntry) -> None:
        self.maps.steering_set(row)

    async def delete(self, row: SteeringEntry) -> None:
        self.maps.steering_delete(row.source, row.destination)

    async def prune(self, rows: Iterable[SteeringEntry]) -> None:
        present = await asyncio.to_thread(self.maps.steering_items)
        keep = {r.key for r in rows}
        for e in present:
            if e.key not in keep:
                self.maps.steering_delete(e.source, e.destination)


class SnatOps:
    """egress_snat on a gateway: which sources leave with which egress IP."""

    def __init__(self, maps: EgressMaps) -> None:
        self.maps = maps

    async def update(self, row: SnatEntry) -> None:
        self.maps.snat_set(row)

    async def delete(self, row: SnatEntry) -> None:
        self.maps.snat_delete(row.source, row.destination)

    async def prune(self, rows: Iterable[SnatEntry]) -> None:
        present = await asyncio.to_thread(self.maps.snat_items)
        keep = {r.key for r in rows}
        for e in present:
            if e.key not in keep:
                self.maps.snat_delete(e.source, e.destination)


@dataclass(frozen=True)
class Tunnel:
    """This node's egress tunnel device, and the uplink its gateway NAT runs on."""

    device: str
    uplink: str

    @property
    def key(self) -> str:
        return self.device


class TunnelOps:
    """The VXLAN device (collect-metadata: the program names each packet's remote node),
    the tunnel map entry, and the NAT programs on the uplink."""

    def __init__(self, maps: EgressMaps, nat_out: Any, nat_in: Any, tunnel_in: Any,
                 netlink: Netlink = AGENT_NETNS) -> None:
        self.maps = maps
        self.nat_out = nat_out
        self.nat_in = nat_in
        self.tunnel_in = tunnel_in
        self.netlink = netlink

    async def update(self, row: Tunnel) -> None:
        idx = await asyncio.to_thread(self._device, row.device)
        # what arrives through it is checked before this node steers anything into it
        await asyncio.to_thread(attach.attach_ingress, row.device,
                                (self.tunnel_in.fd, self.tunnel_in.name), self.netlink)
        self.maps.tunnel_set(idx)
        try:
            await asyncio.to_thread(attach.attach, row.uplink, (self.nat_out.fd, self.nat_out.name),
                                    (self.nat_in.fd, self.nat_in.name), self.netlink, True)
        except LookupError as e:
            raise TemporaryError(f"uplink {row.uplink}: {e}", delay=1.0) from None

    def _device(self, name: str) -> int:
        with self.netlink.route() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                ipr.link("add", ifname=name, kind="vxlan", vxlan_port=VXLAN_PORT,
                         vxlan_collect_metadata=1, address=TUNNEL_MAC)
                found = ipr.link_lookup(ifname=name)
            idx = int(found[0])
            ipr.link("set", index=idx, address=TUNNEL_MAC, state="up")
            return idx

    async def delete(self, row: Tunnel) -> None:
        self.maps.tunnel_set(0)
        await asyncio.to_thread(attach.detach, row.uplink, self.netlink)
        await asyncio.to_thread(self._remove, row.device)

    def _remove(self, name: str) -> None:
        with self.netlink.route() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])

    async def prune(self, rows: Iterable[Tunnel]) -> None:
        return  # one device, named by config: a removed row is deleted by `delete`


def uplink_of(ip: str, netlink: Netlink = AGENT_NETNS) -> str | None:
    """The interface holding `ip` (the node's address): where traffic leaves the node."""
    with netlink.route() as ipr:
        for a in ipr.get_addr(address=ip):
            links = ipr.get_links(a["index"])
            if links:
                return str(links[0].get_attr("IFLA_IFNAME"))
    return None


def interface_addresses(names: Iterable[str], netlink: Netlink = AGENT_NETNS) -> dict[str, str | None]:
    """The first IPv4 address of each named interface here (None: it has none, or is gone)."""
    out: dict[str, str | None] = {}
    with netlink.route() as ipr:
        for name in names:
            out[name] = None
            found = ipr.link_lookup(ifname=name)
            if not found:
                continue
            for a in ipr.get_addr(family=2, index=found[0]):
                ip = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                if ip:
                    out[name] = str(ip)
                    break
    return out

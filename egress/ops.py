"""Reconciler targets of the egress datapath: the steering and translation maps (through
`bpf.egress`), the node's tunnel device with the gateway NAT on its uplink, and the egress
IPs an active gateway claims on its own segments (address and gratuitous ARP)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bpf import attach
from bpf.egress import TUNNEL_MAC, EgressMaps, SnatEntry, SteeringEntry
from egress.claims import ArpClaim, InterfaceAddress
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.reconciler import TemporaryError

VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
# IFA_PROTO of the egress IPs this agent adds to an interface: what prune may remove, and
# what it never touches (an address without it was put there by someone else)
ADDRESS_PROTOCOL = 190
EEXIST, ENOENT, ENODEV, EADDRNOTAVAIL = 17, 2, 19, 99


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
                if ip and a.get_attr("IFA_PROTO") != ADDRESS_PROTOCOL:  # not an egress IP claimed
                    out[name] = str(ip)
                    break
    return out


ARPHRD_ETHER, ETH_P_ARP, ETH_P_IP, ARPOP_REQUEST = 1, 0x0806, 0x0800, 1
BROADCAST_MAC = b"\xff" * 6
ETH_MIN_FRAME = 60  # without the FCS; short frames are padded
# A gratuitous ARP is a broadcast nobody acknowledges: a few copies, in case one is lost
GRATUITOUS_ARP_COPIES = 3
GRATUITOUS_ARP_SPACING = 0.5


def gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """An ARP announcement (RFC 5227): a broadcast request whose sender and target are both
    `ip`. Linux updates an existing neighbour entry from it at once, within its locktime."""
    addr = socket.inet_aton(ip)
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST,
                      mac, addr, b"\0" * 6, addr)
    frame = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(ETH_MIN_FRAME, b"\0")


class ClaimOps:
    """An egress IP claimed on its segment: the address on the interface (/32, marked
    ADDRESS_PROTOCOL), then gratuitous ARP so the segment's hosts send to this node's MAC.
    An address that is there without the mark is someone else's: never changed or removed,
    reported as the row's error."""

    def __init__(self, netlink: Netlink = AGENT_NETNS, copies: int = GRATUITOUS_ARP_COPIES,
                 spacing: float = GRATUITOUS_ARP_SPACING) -> None:
        self.netlink = netlink
        self.copies = copies
        self.spacing = spacing

    async def update(self, row: ArpClaim) -> None:
        mac = await asyncio.to_thread(self._add, row)
        with self.netlink.entered():  # bound in the agent's namespace, used from anywhere
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            sock.bind((row.interface, ETH_P_ARP))
            sock.setblocking(False)
            frame = gratuitous_arp(mac, row.egress_ip)
            for copy in range(self.copies):
                if copy:
                    await asyncio.sleep(self.spacing)
                sock.send(frame)
        except OSError as e:
            raise TemporaryError(f"gratuitous ARP for {row.egress_ip} on {row.interface}: {e}",
                                 delay=1.0) from None
        finally:
            sock.close()

    def _add(self, row: ArpClaim) -> bytes:
        """The address on the interface, marked ours; the interface's MAC."""
        with self.netlink.route() as ipr:
            found = ipr.link_lookup(ifname=row.interface)
            if not found:
                raise TemporaryError(f"egress IP {row.egress_ip}: no interface {row.interface} "
                                     "to claim it on", delay=1.0)
            idx = int(found[0])
            present = [a for a in ipr.get_addr(family=socket.AF_INET, index=idx)
                       if a.get_attr("IFA_LOCAL") == row.egress_ip]
            if any(a.get_attr("IFA_PROTO") != ADDRESS_PROTOCOL for a in present):
                raise TemporaryError(f"egress IP {row.egress_ip} is an address of {row.interface} "
                                     "that this agent did not add: left as it is", delay=10.0)
            if not present:
                try:
                    ipr.addr("add", index=idx, address=row.egress_ip, prefixlen=32,
                             proto=ADDRESS_PROTOCOL)
                except Exception as e:  # pyroute2's NetlinkError; added meanwhile: retried
                    if getattr(e, "code", None) != EEXIST:
                        raise
                    raise TemporaryError(f"egress IP {row.egress_ip} appeared on "
                                         f"{row.interface} meanwhile", delay=0.1) from None
            mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
            return bytes.fromhex(str(mac).replace(":", ""))

    async def delete(self, row: ArpClaim) -> None:
        await asyncio.to_thread(self._remove, [row])

    async def prune(self, rows: Iterable[ArpClaim]) -> None:
        ours = await asyncio.to_thread(self._ours)
        keep = {r.key for r in rows}
        await asyncio.to_thread(self._remove, [c for c in ours if c.key not in keep])

    def _ours(self) -> list[ArpClaim]:
        return [ArpClaim(a.address, a.interface) for a in ethernet_addresses(self.netlink)
                if a.ours and a.prefixlen == 32]

    def _remove(self, rows: list[ArpClaim]) -> None:
        """Each row's address, only where it carries our mark; what is gone is success."""
        if not rows:
            return
        with self.netlink.route() as ipr:
            for row in rows:
                found = ipr.link_lookup(ifname=row.interface)
                if not found:
                    continue
                for a in ipr.get_addr(family=socket.AF_INET, index=found[0]):
                    if (a.get_attr("IFA_LOCAL") == row.egress_ip
                            and a.get_attr("IFA_PROTO") == ADDRESS_PROTOCOL):
                        try:
                            ipr.addr("del", index=found[0], address=row.egress_ip,
                                     prefixlen=a["prefixlen"])
                        except Exception as e:  # NetlinkError; removed meanwhile is success
                            if getattr(e, "code", None) != EADDRNOTAVAIL:
                                raise


def ethernet_addresses(netlink: Netlink = AGENT_NETNS) -> list[InterfaceAddress]:
    """The IPv4 addresses of the namespace's Ethernet interfaces (those ARP runs on)."""
    with netlink.route() as ipr:
        addrs = list(ipr.get_addr(family=socket.AF_INET))
        indexes = sorted({a["index"] for a in addrs})
        links = {link["index"]: link for link in (ipr.get_links(*indexes) if indexes else [])}
    out = []
    for a in addrs:
        link = links.get(a["index"])
        if link is None or link["ifi_type"] != ARPHRD_ETHER:
            continue
        out.append(InterfaceAddress(str(link.get_attr("IFLA_IFNAME")), str(a.get_attr("IFA_LOCAL")),
                                    int(a["prefixlen"]), a.get_attr("IFA_PROTO") == ADDRESS_PROTOCOL))
    return out

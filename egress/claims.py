"""The egress IPs an active gateway claims on its own segments, with gratuitous ARP.

An active gateway announces its egress IPs as host routes over BGP (`held_egress_ips`). The
hosts of a segment do not follow a route to an address of their own subnet: they ask for it
with ARP. So when an egress IP lies inside the subnet of one of this node's interfaces, the
active gateway also adds it to that interface (a /32, marked as the agent's) and announces
it with gratuitous ARP: the segment's hosts and its router send to this node's MAC at once,
and to the next gateway's after a failover. The BGP /32 stays as it is.

Pure derivation here (`arp_claims`); the kernel side is `egress.ops.ClaimOps`, the addresses
it derives from are read by `egress.ops.ethernet_addresses`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from plexus.core.clock import Clock
from plexus.core.prefixes import HostPrefix
from plexus.core.tables import Table

log = logging.getLogger(__name__)
ClaimKey = tuple[str, str]  # (egress IP, interface)
# Interface addresses change rarely and a read is one netlink dump: a read every few seconds
# finds a new segment address in time, without a netlink subscription to keep alive.
ADDRESS_READ_INTERVAL = 2.0


@dataclass(frozen=True)
class InterfaceAddress:
    """An IPv4 address of one of this node's Ethernet interfaces (ARP needs a MAC)."""

    interface: str
    address: str
    prefixlen: int
    ours: bool = False  # marked as added by this agent (a claim, made now or by a past run)


@dataclass(frozen=True)
class ArpClaim:
    """An egress IP this node holds on `interface`, announced there with gratuitous ARP."""

    egress_ip: str
    interface: str

    @property
    def key(self) -> ClaimKey:
        return (self.egress_ip, self.interface)


@dataclass(frozen=True)
class Claims:
    rows: list[ArpClaim]
    left_alone: list[str]  # egress IPs an interface has already, not added by this agent


def claims_table() -> Table[ClaimKey, ArpClaim]:
    return Table("egress-arp-claims", key=lambda c: c.key)


def arp_claims(held: Iterable[HostPrefix], addresses: Iterable[InterfaceAddress],
               node_ip: str) -> Claims:
    """For each held egress IP (IPv4) inside the on-link subnet of an interface (an address
    of it with a prefix shorter than /32, not one this agent added), a claim on that
    interface; the most specific subnet wins, then the interface name. Not the node's own
    IP, and not an address an interface has already that this agent did not add: the node
    answers ARP for it anyway, and it is not ours to move (reported in `left_alone`)."""
    addrs = list(addresses)
    foreign = {a.address: a.interface for a in addrs if not a.ours}
    subnets = [(ipaddress.IPv4Network(f"{a.address}/{a.prefixlen}", strict=False), a.interface)
               for a in addrs if not a.ours and a.prefixlen < 32]
    rows: list[ArpClaim] = []
    left_alone: list[str] = []
    for ip in sorted({p.prefix.split("/")[0] for p in held}):
        if ":" in ip or ip == node_ip:
            continue
        if ip in foreign:
            left_alone.append(f"{ip} is an address of {foreign[ip]} that this agent did not "
                              "add: left as it is, not claimed")
            continue
        address = ipaddress.IPv4Address(ip)
        covering = sorted(((-net.prefixlen, ifname) for net, ifname in subnets if address in net))
        if covering:
            rows.append(ArpClaim(ip, covering[0][1]))
    return Claims(rows, left_alone)


class SegmentClaims:
    """This node's claims table and the interface addresses it is derived from.

    The table holds its prune back (the reconciler would remove the addresses a past run
    claimed) until a derivation has seen the interface addresses: before the first read
    every egress IP looks off-segment."""

    def __init__(self, read: Callable[[], list[InterfaceAddress]],
                 interval: float = ADDRESS_READ_INTERVAL) -> None:
        self.table = claims_table()
        self.read = read
        self.interval = interval
        self.addresses: tuple[InterfaceAddress, ...] | None = None  # None: not read yet
        self.left_alone: list[str] = []
        self._addresses_seen: Callable[[], None] | None = self.table.register_initializer(
            "interface-addresses")

    def derive(self, held: Iterable[HostPrefix], node_ip: str) -> None:
        claims = arp_claims(held, self.addresses or (), node_ip)
        self.table.replace_where(lambda _c: True, claims.rows)
        self.left_alone = claims.left_alone
        if self.addresses is not None and self._addresses_seen is not None:
            self._addresses_seen()
            self._addresses_seen = None

    async def follow(self, clock: Clock, changed: asyncio.Event) -> None:
        """Read the addresses now and every `interval`; set `changed` when they differ."""
        never = asyncio.Event()
        while True:
            try:
                read = await asyncio.to_thread(self.read)
            except Exception as e:  # netlink: the next read may succeed; the last one stands
                log.warning("egress: reading the interface addresses failed: %s", e)
            else:
                # our own claims change nothing the derivation reads: no recompute for them
                found = tuple(sorted((a for a in read if not a.ours),
                                     key=lambda a: (a.interface, a.address)))
                if found != self.addresses:
                    self.addresses = found
                    changed.set()
            await clock.wait_until(clock.now() + self.interval, never)

    def listing(self) -> dict[str, list[str]]:
        return {"claimed": [f"{c.egress_ip} on {c.interface}" for c in
                            sorted(self.table, key=lambda c: c.key)],
                "leftAlone": list(self.left_alone)}

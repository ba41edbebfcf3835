"""The egress gateway's pinned maps (programs/egress.h), read and written with typed rows.

- `egress_policy` (on a source node): (source pod IP, destination CIDR) -> the gateway node
  to tunnel to, or excluded, or no gateway (dropped);
- `egress_snat` (on a gateway): (source pod IP, destination CIDR) -> the egress IP;
- `egress_tunnel`: this node's tunnel device and the MAC all tunnel devices carry;
- `egress_nat` / `egress_revnat`: the gateway's translations, made by the datapath itself;
  they live as conntrack entries do (`bpf.loader.ct_lifetime`) and `expire` sweeps them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

from bpf.loader import CT_CLOSING, ct_lifetime, ip_u32, u32_ip

EXCLUDED, NO_GATEWAY = 1, 2           # EGRESS_* flags of programs/egress.h
NAT_CLOSING = 1                       # EGRESS_NAT_CLOSING
VNI = 0xE6E6                          # EGRESS_VNI
TUNNEL_MAC = "02:70:6c:78:65:67"      # every egress tunnel device's address ("plxeg")
PORT_MIN, PORT_MAX = 32768, 60999     # what the gateway translates source ports to


@dataclass(frozen=True)
class SteeringEntry:
    """Where a local pod's packets to `destination` leave: `gateway` (a node IP), `excluded`
    (as before), or neither (no healthy gateway: dropped)."""

    source: str
    destination: str
    gateway: str | None = None
    excluded: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.destination)


@dataclass(frozen=True)
class SnatEntry:
    """On the gateway: `source`'s packets to `destination` leave with `egress_ip`, or
    untranslated when `excluded` (a more specific excludedCIDR); replies go back through the
    tunnel to `source_node` (None: a pod of this node)."""

    source: str
    destination: str
    egress_ip: str | None
    excluded: bool = False
    source_node: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.destination)


@dataclass(frozen=True)
class NatConnection:
    """One translated connection: the pod's (address, port) -> the egress IP's."""

    proto: int
    pod: str
    pod_port: int
    peer: str
    peer_port: int
    egress_ip: str
    egress_port: int
    closing: bool = False


def _net(destination: str) -> tuple[int, int]:
    net = ipaddress.ip_network(destination, strict=False)
    if net.version != 4:
        raise ValueError(f"destination {destination}: the egress datapath is IPv4 only")
    return ip_u32(str(net.network_address)), net.prefixlen


def _port(raw: int) -> int:
    return socket.ntohs(raw)


class EgressMaps:
    """The maps of one loaded datapath (`bpf`: its bcc object)."""

    def __init__(self, bpf: Any) -> None:
        self.policy: Any = bpf["egress_policy"]
        self.snat: Any = bpf["egress_snat"]
        self.tunnel: Any = bpf["egress_tunnel"]
        self.nat: Any = bpf["egress_nat"]
        self.revnat: Any = bpf["egress_revnat"]

    def _key(self, table: Any, source: str, destination: str) -> Any:
        dst, length = _net(destination)
        return table.Key(32 + length, ip_u32(source), dst)

    # ---- steering (source nodes) ----------------------------------------------------
    def steering_set(self, e: SteeringEntry) -> None:
        flags = EXCLUDED if e.excluded else (0 if e.gateway else NO_GATEWAY)
        gateway = ip_u32(e.gateway) if e.gateway and not e.excluded else 0
        self.policy[self._key(self.policy, e.source, e.destination)] = self.policy.Leaf(gateway, 0, flags)

    def steering_delete(self, source: str, destination: str) -> None:
        try:
            del self.policy[self._key(self.policy, source, destination)]
        except KeyError:
            pass

    def steering_items(self) -> list[SteeringEntry]:
        out = []
        for k, v in self.policy.items():
            dest = f"{u32_ip(k.destination)}/{k.prefixlen - 32}"
            out.append(SteeringEntry(u32_ip(k.source), dest,
                                     u32_ip(v.gateway) if v.gateway else None,
                                     bool(v.flags & EXCLUDED)))
        return out

    def tunnel_set(self, ifindex: int, mac: str = TUNNEL_MAC) -> None:
        raw = (ctypes.c_ubyte * 6)(*bytes.fromhex(mac.replace(":", "")))
        self.tunnel[ctypes.c_uint32(0)] = self.tunnel.Leaf(ifindex, raw)

    # ---- translation (gateways) -----------------------------------------------------
    def snat_set(self, e: SnatEntry) -> None:
        egress_ip = ip_u32(e.egress_ip) if e.egress_ip and not e.excluded else 0
        via = ip_u32(e.source_node) if e.source_node else 0
        self.snat[self._key(self.snat, e.source, e.destination)] = self.snat.Leaf(
            via, egress_ip, EXCLUDED if e.excluded else 0)

    def snat_delete(self, source: str, destination: str) -> None:
        try:
            del self.snat[self._key(self.snat, source, destination)]
        except KeyError:
            pass

    def snat_items(self) -> list[SnatEntry]:
        return [SnatEntry(u32_ip(k.source), f"{u32_ip(k.destination)}/{k.prefixlen - 32}",
                          u32_ip(v.egress_ip) if v.egress_ip else None, bool(v.flags & EXCLUDED),
                          u32_ip(v.gateway) if v.gateway else None)
                for k, v in self.snat.items()]

    def connections(self, now_ns: int | None = None) -> list[NatConnection]:
        """The live translations (`now_ns`: CLOCK_MONOTONIC, as the datapath's clock)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return [NatConnection(k.proto, u32_ip(k.saddr), _port(k.sport), u32_ip(k.daddr),
                              _port(k.dport), u32_ip(v.addr), _port(v.port),
                              bool(v.flags & NAT_CLOSING))
                for k, v in self.nat.items() if _live(k.proto, v, now_ns)]

    def expire(self, now_ns: int | None = None) -> int:
        """Remove the translations whose lifetime has run out (both directions, and a reverse
        entry left alone); returns how many connections went."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        gone = 0
        for k, v in list(self.nat.items()):
            if _live(k.proto, v, now_ns) or (v := self.nat.get(k)) is None or _live(k.proto, v, now_ns):
                continue  # read again: the datapath may have just used it
            rev = self.revnat.Key(k.daddr, v.addr, k.dport, v.port, k.proto)
            back = self.revnat.get(rev)
            if back is not None and back.addr == k.saddr and back.port == k.sport \
                    and not _live(k.proto, back, now_ns):
                _drop(self.revnat, rev)
            gone += _drop(self.nat, k)
        for k, v in list(self.revnat.items()):
            if not _live(k.proto, v, now_ns):
                _drop(self.revnat, k)
        return gone


def _live(proto: int, v: Any, now_ns: int) -> bool:
    flags = CT_CLOSING if v.flags & NAT_CLOSING else 0
    return bool(now_ns - v.seen < ct_lifetime(proto, flags) * 1_000_000_000)


def _drop(table: Any, key: Any) -> int:
    try:
        del table[key]
        return 1
    except KeyError:  # the datapath replaced or evicted it meanwhile
        return 0

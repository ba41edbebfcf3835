"""What the node sent its router, read from a tcpdump capture taken in the node's namespace.

`Capture` runs tcpdump on the lab's link (into the lab's process list, its file under the
lab's temp dir); `sessions` reassembles each TCP connection the node opened to port 179 and
splits it into BGP messages, so a test can check the order of UPDATEs on the wire: which
prefixes each announced or withdrew, and where End-of-RIB came.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from tests.bgp_lab import Lab

BGP_PORT = 179
FAMILIES = {(1, 1): "ipv4", (2, 1): "ipv6"}


@dataclass(frozen=True)
class Update:
    """One UPDATE: an End-of-RIB (`eor`), or the prefixes it announces and withdraws."""

    family: str
    announced: tuple[str, ...] = ()
    withdrawn: tuple[str, ...] = ()
    eor: bool = False
    time: float = 0.0  # when the packet that completed it was captured (wall clock)


@dataclass
class Session:
    """The UPDATEs of one TCP connection from the node, in the order they were sent."""

    port: int
    updates: list[Update] = field(default_factory=list)

    def announced(self, family: str = "ipv4") -> set[str]:
        return {p for u in self.updates if u.family == family for p in u.announced}

    def withdrawn(self) -> set[str]:
        return {p for u in self.updates for p in u.withdrawn}

    def eor_after_routes(self, family: str = "ipv4") -> bool:
        """End-of-RIB of the family came, and after the last UPDATE announcing any of it."""
        eors = [i for i, u in enumerate(self.updates) if u.eor and u.family == family]
        routes = [i for i, u in enumerate(self.updates) if u.announced and u.family == family]
        return bool(eors) and (not routes or eors[0] > routes[-1])


class Capture:
    """tcpdump on the node's side of the lab link, BGP only, every packet in full."""

    def __init__(self, lab: Lab, name: str = "bgp") -> None:
        self.lab = lab
        self.path = lab.tmp / f"{name}.pcap"
        log = (lab.tmp / f"{name}.tcpdump.log").open("wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.node_ns, "tcpdump", "-i", lab.node_link, "-s", "0", "-U", "-n",
             "-w", str(self.path), "tcp", "port", str(BGP_PORT)], stdout=log, stderr=log)
        log.close()
        lab.procs.append(self.proc)
        deadline = time.monotonic() + 10
        while not (self.path.exists() and self.path.stat().st_size >= 24):  # pcap header: listening
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"tcpdump did not start: {(lab.tmp / f'{name}.tcpdump.log').read_text()}")
            time.sleep(0.02)

    def sessions(self, node_ip: str) -> list[Session]:
        return sessions(self.path.read_bytes(), node_ip)


def _packets(data: bytes) -> list[tuple[float, bytes]]:
    """(capture time, link-layer frame) of each packet of a pcap file (Ethernet)."""
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"pcap link type {linktype}, expected Ethernet")
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    out, i = [], 24
    while i + 16 <= len(data):
        sec, frac, incl = struct.unpack(endian + "III", data[i:i + 12])
        out.append((sec + frac * scale, data[i + 16:i + 16 + incl]))
        i += 16 + incl
    return out


@dataclass
class Stream:
    """The bytes the node sent on one connection, and when each part of them was captured."""

    port: int
    data: bytes
    ends: list[tuple[int, float]]  # (offset just past a segment, its capture time), ascending

    def time_of(self, offset: int) -> float:
        """When the byte at this offset was captured."""
        i = bisect.bisect_right(self.ends, offset, key=lambda e: e[0])
        return self.ends[min(i, len(self.ends) - 1)][1] if self.ends else 0.0


def _streams(frames: list[tuple[float, bytes]], node_ip: str) -> list[Stream]:
    """Each TCP connection the node opened to port 179, in order."""
    node = ipaddress.IPv4Address(node_ip).packed
    isn: dict[int, int] = {}
    order: list[int] = []
    segments: dict[int, dict[int, tuple[float, bytes]]] = {}
    for ts, f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00":
            continue
        ip = f[14:]
        ihl, total = (ip[0] & 0x0F) * 4, struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6 or ip[12:16] != node:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        flags, doff = tcp[13], (tcp[12] >> 4) * 4
        if dport != BGP_PORT:
            continue
        if flags & 0x02:  # SYN: a new connection from this port
            isn[sport] = seq
            order.append(sport)
            segments[sport] = {}
            continue
        payload = tcp[doff:]
        if sport in isn and payload:
            segments[sport].setdefault((seq - isn[sport] - 1) % 2**32, (ts, payload))
    out = []
    for port in order:
        stream = bytearray()
        ends: list[tuple[int, float]] = []
        for off in sorted(segments[port]):
            ts, chunk = segments[port][off]
            if off + len(chunk) <= len(stream):
                continue  # retransmitted
            if off > len(stream):
                break  # a gap: the capture lost a packet
            stream += chunk[len(stream) - off:]
            ends.append((len(stream), ts))
        out.append(Stream(port, bytes(stream), ends))
    return out


def _prefixes(data: bytes, width: int) -> list[str]:
    out, i = [], 0
    while i < len(data):
        mask = data[i]
        size = (mask + 7) // 8
        addr = data[i + 1:i + 1 + size].ljust(width, b"\0")
        net: Any = ipaddress.IPv4Network if width == 4 else ipaddress.IPv6Network
        out.append(str(net((addr, mask))))
        i += 1 + size
    return out


def parse_update(body: bytes) -> Update:
    wlen = struct.unpack("!H", body[:2])[0]
    withdrawn = _prefixes(body[2:2 + wlen], 4)
    alen = struct.unpack("!H", body[2 + wlen:4 + wlen])[0]
    attrs, nlri = body[4 + wlen:4 + wlen + alen], body[4 + wlen + alen:]
    announced = _prefixes(nlri, 4)
    if not withdrawn and not attrs and not announced:
        return Update("ipv4", eor=True)
    family, i = "ipv4", 0
    while i < len(attrs):
        flags, code = attrs[i], attrs[i + 1]
        if flags & 0x10:
            length, head = struct.unpack("!H", attrs[i + 2:i + 4])[0], 4
        else:
            length, head = attrs[i + 2], 3
        value = attrs[i + head:i + head + length]
        i += head + length
        if code in (14, 15):
            afi, safi = struct.unpack("!HB", value[:3])
            family = FAMILIES.get((afi, safi), f"{afi}/{safi}")
            width = 16 if afi == 2 else 4
            if code == 14:
                nh_len = value[3]
                announced += _prefixes(value[5 + nh_len:], width)
            elif len(value) == 3 and alen == head + 3:
                return Update(family, eor=True)  # MP_UNREACH alone, empty: End-of-RIB
            else:
                withdrawn += _prefixes(value[3:], width)
    return Update(family, tuple(announced), tuple(withdrawn))


def sessions(pcap: bytes, node_ip: str) -> list[Session]:
    """Every connection the node opened to the router's port 179 with what it sent on it."""
    out = []
    for st in _streams(_packets(pcap), node_ip):
        s, stream = Session(st.port), st.data
        i = 0
        while i + 19 <= len(stream):
            length, kind = struct.unpack("!HB", stream[i + 16:i + 19])
            if length < 19 or i + length > len(stream):
                break
            if kind == 2:
                u = parse_update(stream[i + 19:i + length])
                s.updates.append(dataclasses.replace(u, time=st.time_of(i + length - 1)))
            i += length
        if s.updates:
            out.append(s)
    return out


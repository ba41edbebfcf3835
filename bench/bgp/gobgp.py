"""GoBGP (Debian's gobgpd 3.10) as the speaker in bench/bgp: its daemon, routes added through
its gRPC API, and the MRT TABLE_DUMPv2 file `gobgp mrt inject` reads.

Routes go in through `AddPathStream`, called with grpcio on hand-encoded protobuf (GoBGP ships
no Python stubs; the field numbers are those of GoBGP 3.10's api/gobgp.proto and
api/attribute.proto). gobgpd listens for gRPC on a unix socket, so nothing listens on an
address outside the test namespaces.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

IPv4Net = ipaddress.IPv4Network


# ---- protobuf, by hand --------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _uint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n) if n else b""


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _any(name: str, value: bytes) -> bytes:
    return _bytes(1, f"type.googleapis.com/apipb.{name}".encode()) + _bytes(2, value)


def path_attributes(communities: Iterable[tuple[int, int]], large: Iterable[tuple[int, int, int]],
                    local_pref: int | None, next_hop: str = "0.0.0.0") -> list[bytes]:
    """`Path.pattrs` (field 2 of Path) as Any messages; origin IGP."""
    attrs = [_any("OriginAttribute", b""), _any("NextHopAttribute", _bytes(1, next_hop.encode()))]
    comms = [a << 16 | b for a, b in communities]
    if comms:
        attrs.append(_any("CommunitiesAttribute", _bytes(1, b"".join(_varint(c) for c in comms))))
    lcs = [_bytes(1, _uint(1, g) + _uint(2, d1) + _uint(3, d2)) for g, d1, d2 in large]
    if lcs:
        attrs.append(_any("LargeCommunitiesAttribute", b"".join(lcs)))
    if local_pref is not None:
        attrs.append(_any("LocalPrefAttribute", _uint(1, local_pref)))
    return attrs


def add_path_requests(nets: Iterable[IPv4Net], pattrs: list[bytes], per_request: int = 1000
                      ) -> Iterator[bytes]:
    """AddPathStreamRequest messages: table GLOBAL (0, the default), `per_request` paths each."""
    family = _bytes(9, _uint(1, 1) + _uint(2, 1))  # Path.family: AFI_IP, SAFI_UNICAST
    shared = b"".join(_bytes(2, a) for a in pattrs) + family
    batch: list[bytes] = []
    for n in nets:
        nlri = _any("IPAddressPrefix", _uint(1, n.prefixlen) + _bytes(2, str(n.network_address).encode()))
        batch.append(_bytes(3, _bytes(1, nlri) + shared))
        if len(batch) == per_request:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)


def add_paths(socket: Path, requests: Iterable[bytes], timeout: float = 600) -> None:
    """One AddPathStream call; returns once gobgpd has answered, i.e. took every path."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = channel.stream_unary("/apipb.GobgpApi/AddPathStream",
                                    request_serializer=None, response_deserializer=None)
        call(iter(requests), timeout=timeout)


# ---- MRT TABLE_DUMPv2, for `gobgp mrt inject global` ---------------------------------------

def mrt_table_dump(nets: Iterable[IPv4Net], peer_ip: str, peer_asn: int,
                   communities: Iterable[tuple[int, int]], large: Iterable[tuple[int, int, int]]) -> bytes:
    """RFC 6396: a PEER_INDEX_TABLE, then one RIB_IPV4_UNICAST record per prefix."""
    now = int(time.time())

    def record(subtype: int, body: bytes) -> bytes:
        return struct.pack("!IHHI", now, 13, subtype, len(body)) + body

    peer = ipaddress.IPv4Address(peer_ip).packed
    out = [record(1, peer + struct.pack("!HH", 0, 1) + b"\x02" + peer + peer + struct.pack("!I", peer_asn))]
    comms = b"".join(struct.pack("!HH", a, b) for a, b in communities)
    lcs = b"".join(struct.pack("!III", *x) for x in large)
    attrs = (bytes([0x40, 1, 1, 0])                                    # ORIGIN IGP
             + bytes([0x40, 2, 6, 2, 1]) + struct.pack("!I", peer_asn)  # AS_PATH (4-byte ASNs)
             + bytes([0x40, 3, 4]) + peer                               # NEXT_HOP
             + (bytes([0xC0, 8, len(comms)]) + comms if comms else b"")
             + (bytes([0xC0, 32, len(lcs)]) + lcs if lcs else b""))
    entry = struct.pack("!HIH", 0, now, len(attrs)) + attrs
    for seq, n in enumerate(nets):
        size = (n.prefixlen + 7) // 8
        out.append(record(2, struct.pack("!IB", seq, n.prefixlen) + n.network_address.packed[:size]
                          + struct.pack("!H", 1) + entry))
    return b"".join(out)


# ---- the daemon ---------------------------------------------------------------------------

def config(router_id: str, asn: int, neighbor: str, neighbor_asn: int, hold: int) -> str:
    return f"""[global.config]
  as = {asn}
  router-id = "{router_id}"

[[neighbors]]
  [neighbors.config]
    neighbor-address = "{neighbor}"
    peer-as = {neighbor_asn}
  [neighbors.timers.config]
    hold-time = {hold}
    keepalive-interval = {max(1, hold // 3)}
    connect-retry = 1
"""


def start(ns: str, tmp: Path, conf: str) -> tuple[subprocess.Popen[bytes], Path]:
    """gobgpd in namespace `ns`, gRPC on a unix socket in tmp; waits until the API answers."""
    (tmp / "gobgpd.toml").write_text(conf)
    sock = tmp / "gobgp.sock"
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "gobgpd", "-f", str(tmp / "gobgpd.toml"),
                             "--api-hosts", f"unix://{sock}", "-l", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while cli(sock, "global").returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gobgpd did not start (exit {proc.poll()})")
        time.sleep(0.05)
    return proc, sock


def cli(sock: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gobgp", "--target", f"unix://{sock}", *args], capture_output=True, text=True,
                          timeout=timeout)


def rib_count(sock: Path) -> int:
    """Destinations in gobgpd's global IPv4 RIB."""
    out = cli(sock, "global", "rib", "summary").stdout
    for line in out.splitlines():
        if "Destination" in line:
            return int(line.split(":")[-1].split(",")[0].strip())
    return -1

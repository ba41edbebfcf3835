"""Global service load-balancing, the pure part: rows, backend ids, the pinned maps.

Merged global services (per affinity) become frontend rows (cluster IP, port, protocol ->
backend ids) and backend rows (id -> address, port, cluster); `LbMaps` reads and writes
them in `lb4_services` and `lb4_backends` (programs/lb.h). The component that drives it
is `bpf.lb_service`; its Ops classes are in `bpf.ops`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bpf.loader import ip_u32, u32_ip
from clustermesh.tables import GlobalService

log = logging.getLogger(__name__)

MAX_BACKENDS = 64  # LB_MAX_BACKENDS in programs/lb.h
PROTOCOLS = {"TCP": 6, "UDP": 17}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
AFFINITIES = {"none": 0, "local": 1, "remote": 2}
AFFINITY_NAMES = {v: k for k, v in AFFINITIES.items()}
VERDICT_TRANSLATED, VERDICT_NO_BACKEND = 3, 4

BackendAddr = tuple[str, int, int]     # (ip, port, protocol number)
FrontendKey = tuple[str, int, int]     # (cluster IP, port, protocol number)


@dataclass(frozen=True)
class LbBackend:
    id: int
    ip: str
    port: int
    proto: int
    cluster: str
    cluster_id: int

    @property
    def key(self) -> int:
        return self.id

    @property
    def addr(self) -> BackendAddr:
        return (self.ip, self.port, self.proto)


@dataclass(frozen=True)
class LbFrontend:
    vip: str
    port: int
    proto: int
    service: str  # namespace/name
    affinity: str
    backend_ids: tuple[int, ...]

    @property
    def key(self) -> FrontendKey:
        return (self.vip, self.port, self.proto)


class BackendIds:
    """Stable ids for backend addresses. Ids are never reused while the agent runs, so a
    frontend that still names a removed backend's id can never reach a different backend;
    on start the ids in the pinned map are adopted."""

    def __init__(self, adopted: dict[BackendAddr, int] | None = None) -> None:
        self.ids: dict[BackendAddr, int] = dict(adopted or {})
        self.next = max(self.ids.values(), default=0) + 1

    def assign(self, addrs: Iterable[BackendAddr]) -> dict[BackendAddr, int]:
        """Ids for exactly `addrs`: known ones keep theirs, new ones get fresh ones."""
        out = {}
        for a in sorted(set(addrs)):
            if a not in self.ids:
                self.ids[a] = self.next
                self.next += 1
            out[a] = self.ids[a]
        self.ids = out
        return out


def derive(services: Iterable[GlobalService], cluster_ids: dict[str, int],
           ids: BackendIds) -> tuple[list[LbFrontend], list[LbBackend]]:
    """Frontend and backend rows for every IPv4 TCP/UDP frontend of the merged services."""
    wanted: dict[FrontendKey, tuple[str, str, list[tuple[BackendAddr, str]]]] = {}
    for svc in services:
        name = f"{svc.namespace}/{svc.name}"
        for vip, ports in sorted(svc.frontends.items()):
            if ":" in vip:
                continue  # IPv4 for now
            for port_name, fe in sorted(ports.items()):
                proto = PROTOCOLS.get(fe.protocol)
                if proto is None:
                    continue  # SCTP: not load-balanced
                members = []
                for b in svc.backends:
                    target = b.ports.get(port_name)
                    if target is None or ":" in b.ip or PROTOCOLS.get(target.protocol) != proto:
                        continue
                    members.append(((b.ip, target.port, proto), b.cluster))
                if len(members) > MAX_BACKENDS:
                    log.warning("service %s %s:%d has %d backends; the first %d are used",
                                name, vip, fe.port, len(members), MAX_BACKENDS)
                    members = members[:MAX_BACKENDS]
                wanted[(vip, fe.port, proto)] = (name, svc.affinity, members)
    assigned = ids.assign(a for _, _, members in wanted.values() for a, _ in members)
    clusters = {a: c for _, _, members in wanted.values() for a, c in members}
    backends = [LbBackend(i, a[0], a[1], a[2], clusters[a], cluster_ids.get(clusters[a], 0))
                for a, i in sorted(assigned.items(), key=lambda x: x[1])]
    frontends = [LbFrontend(k[0], k[1], k[2], name, affinity,
                            tuple(assigned[a] for a, _ in members))
                 for k, (name, affinity, members) in sorted(wanted.items())]
    return frontends, backends


class LbMaps:
    """The pinned LB maps of the loaded datapath (ports in network byte order)."""

    def __init__(self, bpf: Any) -> None:
        self.services: Any = bpf["lb4_services"]
        self.backends: Any = bpf["lb4_backends"]
        self.flows: Any = bpf["lb4_flows"]

    def _skey(self, vip: str, port: int, proto: int) -> Any:
        return self.services.Key(ip_u32(vip), socket.htons(port), proto, 0)

    def service_set(self, f: LbFrontend) -> None:
        leaf = self.services.Leaf()
        leaf.count = len(f.backend_ids)
        leaf.affinity = AFFINITIES.get(f.affinity, 0)
        for i, bid in enumerate(f.backend_ids[:MAX_BACKENDS]):
            leaf.backends[i] = bid
        self.services[self._skey(f.vip, f.port, f.proto)] = leaf

    def service_delete(self, key: FrontendKey) -> None:
        try:
            del self.services[self._skey(*key)]
        except KeyError:
            pass

    def service_items(self) -> dict[FrontendKey, tuple[str, tuple[int, ...]]]:
        return {(u32_ip(k.vip), socket.ntohs(k.port), k.proto):
                (AFFINITY_NAMES.get(v.affinity, str(v.affinity)),
                 tuple(v.backends[i] for i in range(min(v.count, MAX_BACKENDS))))
                for k, v in self.services.items()}

    def backend_set(self, b: LbBackend) -> None:
        self.backends[self.backends.Key(b.id)] = self.backends.Leaf(
            ip_u32(b.ip), socket.htons(b.port), b.proto, b.cluster_id)

    def backend_delete(self, bid: int) -> None:
        try:
            del self.backends[self.backends.Key(bid)]
        except KeyError:
            pass

    def backend_items(self) -> dict[int, tuple[str, int, int, int]]:
        return {k.value: (u32_ip(v.addr), socket.ntohs(v.port), v.proto, v.cluster_id)
                for k, v in self.backends.items()}

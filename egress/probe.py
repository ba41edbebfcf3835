"""Gateway health as this source node sees it: an ICMP echo to each gateway node of the
policies that select a pod here, every `interval`; `threshold` probes in a row without an
answer make the gateway unhealthy (defaults: 100 ms x 3, so a dead gateway is known within
400 ms), one answer makes it healthy again (the hold-down in `egress.failover` keeps a
flapping gateway from taking over at once). Rows go to GATEWAY_HEALTH under this node's
reporter name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from clustermesh.tables import NodeKey
from egress.tables import GatewayHealth, HealthKey, node_name
from plexus.core.clock import Clock
from plexus.core.tables import Table

log = logging.getLogger(__name__)
ECHO_REQUEST, ECHO_REPLY = 8, 0


class Pinger(Protocol):
    def send(self, ip: str, seq: int) -> None: ...
    def open(self, on_reply: Callable[[str, int], None]) -> None: ...
    def close(self) -> None: ...


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


class IcmpPinger:
    """Echo requests over one raw ICMP socket of the agent's namespace; replies are matched
    by this process's identifier."""

    def __init__(self) -> None:
        self.ident = os.getpid() & 0xFFFF
        self.sock: socket.socket | None = None

    def open(self, on_reply: Callable[[str, int], None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        sock = self.sock

        def readable() -> None:
            while True:
                try:
                    data, (src, _port) = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    return
                start = (data[0] & 0x0F) * 4  # past the IP header a raw socket is given
                if len(data) < start + 8:
                    continue
                kind, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", data, start)
                if kind == ECHO_REPLY and ident == self.ident:
                    on_reply(src, seq)

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    def send(self, ip: str, seq: int) -> None:
        assert self.sock is not None
        body = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, self.ident, seq) + b"plexus-egress"
        packet = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
        try:
            self.sock.sendto(packet, (ip, 0))
        except OSError:
            return  # no route now: the missing answer says so

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


@dataclass
class _Target:
    ip: str
    sent: int = 0        # sequence of the last probe sent
    answered: int = -1   # sequence of the last answer
    missed: int = 0
    healthy: bool | None = None
    since: float = field(default=0.0)


class GatewayProber:
    """Probes what `targets()` names (gateway node -> its IP) and writes what it finds."""

    def __init__(self, reporter: str, health: Table[HealthKey, GatewayHealth], clock: Clock,
                 targets: Callable[[], Mapping[NodeKey, str]], interval: float, threshold: int,
                 pinger: Pinger | None = None) -> None:
        self.reporter = reporter
        self.health = health
        self.clock = clock
        self.targets = targets
        self.interval = interval
        self.threshold = threshold
        self.pinger: Pinger = pinger or IcmpPinger()
        self.state: dict[NodeKey, _Target] = {}
        self._by_ip: dict[str, NodeKey] = {}

    def _on_reply(self, ip: str, seq: int) -> None:
        key = self._by_ip.get(ip)
        if key is not None and key in self.state:
            self.state[key].answered = seq

    async def run(self) -> None:
        self.pinger.open(self._on_reply)
        seq = 0
        try:
            while True:
                seq = (seq + 1) & 0xFFFF
                self.round(seq)
                await asyncio.sleep(self.interval)
        finally:
            self.pinger.close()

    def round(self, seq: int) -> None:
        """Judge the last probe of every target, then send the next."""
        wanted = dict(self.targets())
        for key in list(self.state):
            if key not in wanted:
                del self.state[key]
                self.health.delete((self.reporter, key))
        self._by_ip = {ip: key for key, ip in wanted.items()}
        for key, ip in wanted.items():
            t = self.state.get(key)
            if t is None or t.ip != ip:
                t = self.state[key] = _Target(ip)
            elif t.answered == t.sent:
                t.missed = 0
                self._judge(key, t, True, "answers")
            else:
                t.missed += 1
                if t.missed >= self.threshold:
                    self._judge(key, t, False, f"{t.missed} probes to {ip} unanswered")
            t.sent = seq
            self.pinger.send(ip, seq)

    def _judge(self, key: NodeKey, t: _Target, up: bool, reason: str) -> None:
        if t.healthy == up:
            return
        if t.healthy is not None or not up:
            log.info("egress gateway=%s %s: %s", node_name(key), "healthy" if up else "unhealthy",
                     reason)
        t.healthy = up
        t.since = self.clock.time()
        self.health.upsert(GatewayHealth(self.reporter, key, up, t.since, reason))

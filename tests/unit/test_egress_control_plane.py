"""The control plane's view of gateway health: what it cannot reach goes onto that node's
published record, and comes off when it answers again or is gone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from clustermesh.apiserver import ApiServer
from clustermesh.apiserver_module import APISERVER
from clustermesh.models import Node, NodeAddress
from egress.controlplane import ControlPlaneHealth, ControlPlaneHealthConfig
from egress.tables import ANNOTATION_CONTROL_PLANE
from plexus.core.clock import ManualClock
from plexus.core.module import Hive


class Answering:
    """Stands in for ICMP: answers from the addresses in `up`, synchronously."""

    def __init__(self) -> None:
        self.up: set[str] = set()
        self.reply: Callable[[str, int], None] | None = None

    def open(self, on_reply: Callable[[str, int], None]) -> None:
        self.reply = on_reply

    def send(self, ip: str, seq: int) -> None:
        if ip in self.up and self.reply is not None:
            self.reply(ip, seq)

    def close(self) -> None:
        self.reply = None


async def annotations_of(server: ApiServer, name: str) -> dict[str, str]:
    want = await server.desired()
    raw = want[f"cilium/state/nodes/v1/east/{name}"]
    return cast(dict[str, str], json.loads(raw)["Annotations"] or {})


def registered(server: ApiServer, name: str, ip: str, **notes: str) -> None:
    server.sources.nodes[f"reg/{name}"] = Node(name, "east", 1, (NodeAddress("InternalIP", ip),),
                                               annotations=dict(notes))


async def test_what_the_control_plane_cannot_reach_is_on_the_nodes_record(tmp_path: Path) -> None:
    hive = Hive(agent=None, state_dir=tmp_path, clock=ManualClock())
    server = hive.provide(APISERVER, ApiServer(cast(Any, None), "east", 1))
    registered(server, "n1", "172.31.1.11", **{"agent/own": "kept"})
    registered(server, "n2", "172.31.1.12")
    cp = ControlPlaneHealth(hive, ControlPlaneHealthConfig(probe_interval=0.5, probe_threshold=3))
    ping = Answering()
    ping.up = {"172.31.1.11", "172.31.1.12"}
    cp.prober.pinger = ping
    cp.prober.pinger.open(cp.prober._on_reply)
    publisher = hive.spawn("egress", cp._publish(), "publish")
    try:
        for seq in range(1, 4):
            cp.prober.round(seq)
        assert await annotations_of(server, "n2") == {}
        ping.up.discard("172.31.1.12")
        for seq in range(4, 8):
            cp.prober.round(seq)
        await _settle()
        assert await annotations_of(server, "n2") == {
            ANNOTATION_CONTROL_PLANE: "3 probes to 172.31.1.12 unanswered"}
        assert await annotations_of(server, "n1") == {"agent/own": "kept"}  # the agent's own stay
        assert cp.status()["unreachable"] == {"east/n2": "3 probes to 172.31.1.12 unanswered"}
        ping.up.add("172.31.1.12")
        for seq in range(8, 10):
            cp.prober.round(seq)
        await _settle()
        assert await annotations_of(server, "n2") == {}
        # gone from the registrations while unreachable: nothing is left behind for it
        ping.up.discard("172.31.1.12")
        for seq in range(10, 15):
            cp.prober.round(seq)
        await _settle()
        assert server.node_annotations == {"n2": {ANNOTATION_CONTROL_PLANE:
                                                  "3 probes to 172.31.1.12 unanswered"}}
        del server.sources.nodes["reg/n2"]
        cp.prober.round(15)
        await _settle()
        assert server.node_annotations == {}
    finally:
        publisher.cancel()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)

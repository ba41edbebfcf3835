"""The service load-balancer in the datapath, without an agent: pods on one node, the maps
filled by hand, real TCP and UDP to the frontend."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bpf import attach
from bpf.lb import LbBackend, LbFrontend, LbMaps
from plexus.cni import ops as cni
from plexus.cni.ops import in_netns
from tests.support import netns, sh, unique, whoami, whoami_server

pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")  # bcc
VIP = "10.96.7.7"
TCP, UDP = 6, 17


@dataclass
class Node:
    ns: str
    dp: Any
    maps: LbMaps
    pods: dict[str, tuple[str, str]]  # name -> (netns, ip)


@pytest.fixture
def node(root: None) -> Iterator[Node]:
    from bpf.loader import Datapath

    with ExitStack() as stack:
        pin = Path(tempfile.mkdtemp(prefix="plexus-lbfs-"))
        sh("mount", "-t", "bpf", "plexus-lbtest", str(pin))
        stack.callback(pin.rmdir)  # callbacks run last first: unmounted, then removed
        stack.callback(sh, "umount", str(pin), check=False)
        node_ns = stack.enter_context(netns("plx-tl"))
        dp = Datapath(pin / "node")
        pods = {}
        for i, name in enumerate(("client", "b1", "b2", "b3")):
            pod_ns = stack.enter_context(netns("plx-tl"))
            ip = f"10.9.0.{i + 2}"
            host_if = unique("plxl")
            with in_netns(f"/var/run/netns/{node_ns}"):
                cni.add(f"/var/run/netns/{pod_ns}", "eth0", host_if, ip, 1500)
                attach.attach(host_if, (dp.from_pod.fd, dp.from_pod.name),
                              (dp.to_pod.fd, dp.to_pod.name))
            pods[name] = (pod_ns, ip)
        yield Node(node_ns, dp, LbMaps(dp.bpf), pods)


def backends(node: Node, names: list[str], proto: int) -> list[LbBackend]:
    return [LbBackend(i + 1 + (100 if proto == UDP else 0), node.pods[n][1], 8080, proto, "east", 1)
            for i, n in enumerate(names)]


def program(node: Node, names: list[str]) -> None:
    for proto in (TCP, UDP):
        bes = backends(node, names, proto)
        for b in bes:
            node.maps.backend_set(b)
        node.maps.service_set(LbFrontend(VIP, 80, proto, "default/web", "none",
                                         tuple(b.id for b in bes)))


def spread(node: Node, proto: str, conns: int = 30) -> set[str | None]:
    client = node.pods["client"][0]
    return {n for c in whoami(client, proto, VIP, 80, conns=conns) for n in c}


def test_tcp_and_udp_spread_stick_and_follow_backend_removal(node: Node) -> None:
    with ExitStack() as stack:
        for name in ("b1", "b2", "b3"):
            for proto in ("tcp", "udp"):
                stack.enter_context(whoami_server(node.pods[name][0], proto, 8080, name))
        program(node, ["b1", "b2", "b3"])
        client = node.pods["client"][0]
        for proto in ("tcp", "udp"):
            # new connections land on every backend; each connection sticks to its own
            assert spread(node, proto) == {"b1", "b2", "b3"}, proto
            for conn in whoami(client, proto, VIP, 80, conns=5, msgs=6):
                assert None not in conn and len(set(conn)) == 1, (proto, conn)

        # bpftool sees the pinned maps with the frontend and its backends
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                              str(node.dp.pin_dir / "lb4_services")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)) == 2

        # a UDP flow keeps its backend; once that backend is gone it moves to a live one
        sock = subprocess.Popen(["ip", "netns", "exec", client, "python3", "-c", STICKY_UDP, VIP],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            first = _ask(sock)
            assert all(_ask(sock) == first for _ in range(5))
            remaining = [n for n in ("b1", "b2", "b3") if n != first]
            node.maps.service_set(LbFrontend(VIP, 80, UDP, "default/web", "none",
                                             tuple(b.id for b in backends(node, remaining, UDP))))
            assert _ask(sock) == first  # the backend still exists: the flow sticks
            gone = next(b for b in backends(node, ["b1", "b2", "b3"], UDP) if b.ip == node.pods[first][1])
            node.maps.backend_delete(gone.id)
            assert _ask(sock) in remaining
        finally:
            sock.kill()
            sock.communicate()

        # removing a backend: no new connection reaches it
        program(node, ["b1", "b3"])
        for proto in ("tcp", "udp"):
            assert spread(node, proto) == {"b1", "b3"}, proto
        # a pod is never its own backend: its reply could not come from the frontend
        stack.enter_context(whoami_server(client, "tcp", 8080, "client"))
        program(node, ["client", "b2"])
        assert spread(node, "tcp", conns=10) == {"b2"}
        # a service with no backend drops, and says why in its counters
        before = node.dp.drop_reasons()
        node.maps.service_set(LbFrontend(VIP, 80, TCP, "default/web", "none", ()))
        assert whoami(client, "tcp", VIP, 80, timeout=1) == [[None]]
        after = node.dp.drop_reasons()
        assert after["no-service-backend"] > before["no-service-backend"]
        assert after["policy-denied"] == before["policy-denied"]
        assert node.dp.counter_totals()["dropped"] == sum(after.values())
        # not a frontend any more: the packet goes to the VIP untouched (and nowhere here)
        node.maps.service_delete((VIP, 80, TCP))
        assert whoami(client, "tcp", VIP, 80, timeout=1) == [[None]]
        # direct traffic to a backend is not translated
        assert whoami(client, "tcp", node.pods["b2"][1], 8080) == [["b2"]]


STICKY_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], 80))
for line in sys.stdin:
    s.send(b"?")
    print(s.recv(100).decode(), flush=True)
"""


def _ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()

"""wireguard-go killed under pod traffic, in the lab: strict mode never leaks, both modes recover.

A pod on east-n1 streams numbered UDP datagrams to a pod on west-n1 (across the clusters,
through the router) while east-n1's wireguard-go is killed with SIGKILL. tcpdump on the
router's leg to every node reads the underlay. In strict mode no datagram shows in the clear;
in either mode the agent restarts the device, the stream resumes within a few seconds, the
loss is bounded by that gap, and `plexus encrypt status` counts the restart.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from encryption.ops import PID_FILE
from plexus.core.netlink import Netlink
from plexus.lab import ops
from plexus.lab.lab import Lab
from plexus.lab.topology import Node, pod_netns
from tests.chaos.faults import plexus
from tests.support import wait_until

MARKER = "PLEXUS-CHAOS-WG"
PORT = 7400
INTERVAL = 0.01  # 100 datagrams a second
RECOVERY = 5.0  # the longest gap in the stream the kill may cause, in seconds


@pytest.fixture(scope="module")
def pods(chaos_lab: Lab) -> tuple[str, str, str]:
    """(sender's namespace, receiver's namespace, receiver's IP)."""
    lab = chaos_lab
    lab.pod_add("east", "n1", "wgchaos-src", {"app": "wgchaos"})
    dst = lab.pod_add("west", "n1", "wgchaos-dst", {"app": "wgchaos"})
    return (pod_netns(lab.topo.node("east", "n1"), "wgchaos-src"),
            pod_netns(lab.topo.node("west", "n1"), "wgchaos-dst"), str(dst["ip"]))


@contextmanager
def router_capture(lab: Lab, name: str) -> Iterator[Callable[[], str]]:
    """tcpdump on the router's leg to every node; yields a reader of headers and payloads as text."""
    legs = [n.host.router_link for n in lab.topo.nodes()]
    paths = [lab.root / f"{name}-{leg}.pcap" for leg in legs]
    # --immediate-mode: without it the last second of packets is lost when tcpdump stops
    dumps = [subprocess.Popen(["ip", "netns", "exec", "plx-router", "tcpdump", "--immediate-mode",
                               "-Z", "root", "-i", leg, "-n", "-U", "-s", "0", "-w", str(path)],
                              stderr=subprocess.DEVNULL)
             for leg, path in zip(legs, paths, strict=True)]
    try:
        def capturing() -> bool:
            for n in lab.topo.nodes():  # tcpdump says "listening" before it captures
                ops.run("ping", "-c", "1", "-W", "1", n.host.segment.gateway, ns=n.host.netns,
                        check=False)
            return all(p.exists() and p.stat().st_size > 24 for p in paths)

        wait_until(capturing, 15, what="tcpdump capturing")

        def read() -> str:
            return "".join(subprocess.run(["tcpdump", "-r", str(p), "-n", "-A"], capture_output=True,
                                          text=True, errors="replace").stdout for p in paths)

        yield read
    finally:
        for d in dumps:
            d.terminate()
        for d in dumps:
            d.wait(10)


def encrypt_status(node: str) -> dict[str, Any]:
    r = plexus("encrypt", "status", "--node", node, "-o", "json")
    assert r.returncode == 0, r.stderr
    status: dict[str, Any] = json.loads(r.stdout)
    return status


def wireguard_go_pid(lab: Lab, node: Node) -> int:
    pid = int((lab.node_dir(node) / "state" / PID_FILE).read_text())
    assert b"wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


@dataclass
class Stream:
    sent: dict[int, float]  # sequence number: when it was sent
    received: set[int]
    send_errors: int

    def longest_gap(self) -> float:
        """The longest time between two datagrams that arrived, by their send times."""
        times = sorted(self.sent[s] for s in self.received)
        return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))

    def lost(self) -> int:
        return len(self.sent) - len(self.received)


def stream(src_ns: str, dst_ns: str, dst_ip: str, seconds: float, tag: str,
           at: float | None = None, action: Callable[[], None] | None = None) -> Stream:
    """Numbered datagrams from `src_ns` to `dst_ns` for `seconds`; `action` runs `at` seconds in."""
    with Netlink(src_ns).entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with Netlink(dst_ns).entered():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", PORT))
    rx.setblocking(False)
    out = Stream({}, set(), 0)
    try:
        start = time.monotonic()
        seq = 0
        while (now := time.monotonic()) - start < seconds:
            if action is not None and at is not None and now - start >= at:
                action()
                action = None
            try:
                tx.sendto(f"{MARKER}-{tag}-{seq:06d}".encode(), (dst_ip, PORT))
            except OSError:
                out.send_errors += 1
            out.sent[seq] = now
            seq += 1
            _drain(rx, tag, out.received)
            time.sleep(INTERVAL)
        deadline = time.monotonic() + 1  # the last ones in flight
        while time.monotonic() < deadline:
            _drain(rx, tag, out.received)
            time.sleep(0.02)
    finally:
        tx.close()
        rx.close()
    return out


def _drain(rx: socket.socket, tag: str, into: set[int]) -> None:
    prefix = f"{MARKER}-{tag}-".encode()
    while True:
        try:
            data = rx.recv(2048)
        except BlockingIOError:
            return
        if data.startswith(prefix):
            into.add(int(data[len(prefix):]))


def kill_wireguard_go_under_traffic(lab: Lab, pods: tuple[str, str, str], tag: str) -> tuple[str, Stream]:
    """Stream across the kill; return what the router saw and the stream."""
    node = lab.topo.node("east", "n1")
    src, dst, dst_ip = pods
    restarts = encrypt_status(node.key)["deviceHealth"]["restarts"]
    # traffic flows encrypted before anything is killed
    warm = stream(src, dst, dst_ip, 1.0, f"{tag}-warm")
    assert warm.received, "no datagram got through before the kill"
    pid = wireguard_go_pid(lab, node)
    with router_capture(lab, f"wgchaos-{tag}") as read:
        during = stream(src, dst, dst_ip, 8.0, tag, at=1.0,
                        action=lambda: os.kill(pid, signal.SIGKILL))  # a PID the lab's agent started
        text = read()
    health = encrypt_status(node.key)["deviceHealth"]
    assert health["up"] and health["restarts"] == restarts + 1, health
    assert health["lastOutage"]["until"] is not None
    assert wireguard_go_pid(lab, node) != pid
    return text, during


def test_strict_mode_never_sends_pod_traffic_in_clear_when_wireguard_go_dies(
        lab: Lab, pods: tuple[str, str, str]) -> None:
    assert encrypt_status("east-n1")["strict"] is True  # the lab runs strict mode
    text, during = kill_wireguard_go_under_traffic(lab, pods, "strict")
    assert MARKER not in text, [ln for ln in text.splitlines() if MARKER in ln][:5]
    assert "51871: UDP" in text  # the capture did see the encrypted stream
    assert during.longest_gap() < RECOVERY, during.longest_gap()
    assert during.lost() <= RECOVERY / INTERVAL, (during.lost(), len(during.sent))
    last = max(during.sent)
    assert last in during.received or last - 1 in during.received, "the stream did not resume"
    routes = ops.run("ip", "route", "show", "table", "51871", ns="plx-east-n1").stdout
    # the protocol by name or number: /etc/iproute2 may name 190
    assert re.search(r"blackhole 10\.2\.1\.0/24 proto \S+ metric 4096", routes), routes


def test_non_strict_mode_restarts_wireguard_go_and_encrypts_again(
        lab: Lab, pods: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    node = lab.topo.node("east", "n1")
    base = Lab.agent_config
    monkeypatch.setattr(Lab, "agent_config", lambda self, n: base(self, n).replace(
        "strict: true", "strict: false") if n.key == node.key else base(self, n))
    lab.up()  # restarts east-n1's agent with its new config
    try:
        wait_until(lambda: encrypt_status(node.key).get("strict") is False, 30,
                   what="east-n1 in non-strict mode")
        # its fallbacks go with strict mode
        wait_until(lambda: "metric 4096" not in ops.run(
            "ip", "route", "show", "table", "51871", ns=node.host.netns).stdout, 90,
            what="strict mode's fallbacks pruned")
        _, during = kill_wireguard_go_under_traffic(lab, pods, "loose")
        assert during.longest_gap() < RECOVERY, during.longest_gap()
        assert during.lost() <= RECOVERY / INTERVAL, (during.lost(), len(during.sent))
        src, dst, dst_ip = pods
        with router_capture(lab, "wgchaos-loose-after") as read:
            after = stream(src, dst, dst_ip, 1.0, "after")
            text = read()
        assert after.received and MARKER not in text
    finally:
        monkeypatch.undo()
        lab.up()
        wait_until(lambda: encrypt_status(node.key).get("strict") is True, 30,
                   what="east-n1 back in strict mode")

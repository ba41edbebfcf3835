"""Faults and probes for the chaos tests: kill a lab process, cut a path, count traffic.

Everything acts inside the lab's namespaces and on PIDs the lab recorded (or their
children): nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plexus.core.client import Client, ClientError
from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import Node
from tests.support import stop_pid, wait_until


def pid_of(lab: Lab, name: str) -> int:
    """The running PID the lab recorded for `name` (etcd-east-0, agent-west-n1, ...)."""
    proc = State.load(lab.state_path).processes[name]
    assert ops.alive(proc.pid, proc.marker), f"{name} (pid {proc.pid}) is not running"
    return proc.pid


def kill(lab: Lab, name: str) -> int:
    """SIGKILL a process the lab recorded; returns its PID once it is gone."""
    proc = State.load(lab.state_path).processes[name]
    assert ops.alive(proc.pid, proc.marker), f"{name} (pid {proc.pid}) is not running"
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: not ops.alive(proc.pid, proc.marker), 10, what=f"{name} gone")
    return proc.pid


def child(parent: int, program: str) -> int | None:
    """The child of `parent` whose command line holds `program` (the agent's ExaBGP)."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended while we listed them
        for pid in children:
            if program in ops.cmdline(int(pid)):
                return int(pid)
    return None


def dead(lab: Lab) -> list[str]:
    """Recorded processes that do not run."""
    return [p.name for p in State.load(lab.state_path).processes.values()
            if not ops.alive(p.pid, p.marker)]


@contextmanager
def partitioned(ns: str, *ips: str) -> Iterator[None]:
    """Namespace `ns` cannot reach `ips` (its packets to them are dropped) until the block ends."""
    for ip in ips:
        ops.run("ip", "route", "add", "blackhole", f"{ip}/32", ns=ns)
    try:
        yield
    finally:
        for ip in ips:
            ops.run("ip", "route", "del", "blackhole", f"{ip}/32", ns=ns, check=False)


def mesh(lab: Lab, node: Node) -> dict[str, Any]:
    """The agent's clustermesh status per cluster ({} while it does not answer)."""
    try:
        clusters: dict[str, Any] = Client(lab.socket(node), timeout=3).get(
            "/v1/clustermesh/status")["clusters"]
        return clusters
    except ClientError:
        return {}


def ready(lab: Lab, node: Node) -> dict[str, bool]:
    return {name: bool(c.get("ready")) for name, c in mesh(lab, node).items()}


def endpoint_ips(lab: Lab, node: Node, cluster: str) -> set[str]:
    """The pod IPs of `cluster` that the agent on `node` knows."""
    rows = Client(lab.socket(node), timeout=5).get("/v1/clustermesh/tables/endpoints", cluster=cluster)
    return {r["ip"] for r in rows}


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], capture_output=True, text=True,
                          timeout=120)


PROBE = r"""
import json, select, socket, sys, time
ip, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
tcp = socket.create_connection((ip, port), timeout=10)
tcp.settimeout(15)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect((ip, port))
udp.setblocking(False)
st = {"tcp_sent": 0, "tcp_echoed": 0, "tcp_error": "", "tcp_max_wait": 0.0,
      "udp_sent": 0, "udp_answered": 0}
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    if not st["tcp_error"]:
        t0 = time.monotonic()
        st["tcp_sent"] += 1
        try:
            tcp.sendall(b"?")
            if not tcp.recv(64):
                raise OSError("closed by the server")
            st["tcp_echoed"] += 1
        except OSError as e:
            st["tcp_error"] = repr(e)
        st["tcp_max_wait"] = max(st["tcp_max_wait"], round(time.monotonic() - t0, 3))
    try:
        udp.send(b"?")
        st["udp_sent"] += 1
    except OSError:
        pass
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        if select.select([udp], [], [], left)[0]:
            try:
                udp.recv(64)
                st["udp_answered"] += 1
            except OSError:
                pass
print(json.dumps(st), flush=True)
"""


class Probe:
    """From namespace `ns`, one TCP connection and one UDP socket to ip:port (a whoami
    server answering both), a message on each every `interval` seconds, counted."""

    def __init__(self, ns: str, ip: str, port: int, interval: float = 0.05) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, ip,
                                      str(port), str(interval)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            stop_pid(self.proc)
            raise AssertionError(f"probe {ns} -> {ip}:{port} did not start: {line} {err}")

    def stop(self) -> dict[str, Any]:
        """Stop sending; the counts."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            out = self.proc.stdout.readline()
            self.proc.wait(30)
            counts: dict[str, Any] = json.loads(out)
            return counts
        finally:
            self.close()

    def close(self) -> None:
        """Stop the probe by its PID and close its pipes (also when a test fails before `stop`)."""
        stop_pid(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


@contextmanager
def probing(ns: str, ip: str, port: int, interval: float = 0.05) -> Iterator[Probe]:
    p = Probe(ns, ip, port, interval)
    try:
        yield p
    finally:
        p.close()

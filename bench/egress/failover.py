"""Egress gateway failover in the lab: the active gateway's agent killed and its link down ->
the first new connection from a selected pod that reaches `plx-ext` with the egress IP.

    .venv/bin/python -m bench.egress.failover [--failovers 20]

The package takes the machine lock itself (bench/__init__.py): do not wrap it in flock.

Brings the lab up (and down at the end), adds a selected pod on east/n1, applies a policy
whose gateways are east/n2 then west/n2, and repeats: wait until the pod leaves through
east/n2; set its link down and kill its agent; from the link going down, time new
connections (one started every 50 ms, each in its own thread) until one is answered with
the egress IP; restore east/n2 (link up, its agent started again; the standby keeps the
traffic for the hold-down, 10 s). Figures: p50/p99/max over the failovers; the parts are
the probes (detection: 100 ms x 3), the standby's announcement of the egress IP (with a
shorter AS path than the dead gateway's route, which the router keeps until its hold timer,
9 s in the lab, runs out), the steering map.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine
from plexus.core.client import Client
from plexus.lab import ops
from plexus.lab.external import PORT
from plexus.lab.lab import Lab, State
from plexus.lab.topology import Node, pod_netns

ROOT = Path(__file__).resolve().parents[2]
EXT_IP, EGRESS_IP = "198.51.100.10", "10.255.0.10"
POLICY = """apiVersion: plexus.io/v1
kind: EgressGatewayPolicy
metadata: {name: bench-failover}
spec:
  selectors:
  - podSelector: {matchLabels: {app: egbench}}
  destinationCIDRs: [198.51.100.0/24]
  egressIP: 10.255.0.10
  egressGateways:
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: east}}
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: west}}
"""
# A new connection every `interval`, each in its own thread (a SYN lost before the failover
# would wait a whole retransmission): prints when (wall clock) the first answer naming `want`
# came.
PROBE = """import json, socket, sys, threading, time
ip, port, want, interval, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], 0.05, 120
start, answered, took = time.monotonic(), threading.Event(), []
def attempt():
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            if json.loads(s.makefile().readline()).get("ip") == want:
                took.append(time.time())
                answered.set()
    except (OSError, ValueError):
        pass
while not answered.is_set() and time.monotonic() - start < limit:
    threading.Thread(target=attempt, daemon=True).start()
    answered.wait(interval)
if took:
    print(f"{min(took):.4f}")
sys.exit(0 if took else 1)
"""


def plexus(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"plexus {' '.join(args)} failed:\n{r.stdout}{r.stderr}")


def first_answer(ns: str, want: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, EXT_IP,
                             str(PORT), want], stdout=subprocess.PIPE, text=True)


def leaves_through(lab: Lab, gateway: Node) -> bool:
    """The source node steers to `gateway` and the router's best route to the egress IP
    goes there (both move back only after the hold-down)."""
    route = lab.birdc("show", "route", f"{EGRESS_IP}/32", "primary")
    if "via" not in route or route.split("via", 1)[1].split()[0] != gateway.host.ip:
        return False
    listing = Client(lab.socket(lab.topo.node("east", "n1")), timeout=5).get("/v1/egress/list")
    return any(a["sourceNode"] == "east/n1" and a["gateway"] == f"{gateway.cluster}/{gateway.name}"
               for p in listing["policies"] for a in p["active"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--failovers", type=int, default=20)
    args = p.parse_args()
    if Path("/var/run/netns/plx-router").exists():
        raise SystemExit("a lab is up: `plexus lab down` first")
    plexus("lab", "up")
    took: list[float] = []
    try:
        lab = Lab(say=lambda _l: None)
        lab.pod_add("east", "n1", "egbench", {"app": "egbench"})
        ns = pod_netns(lab.topo.node("east", "n1"), "egbench")
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "policy.yaml"
            f.write_text(POLICY)
            plexus("apply", "-f", str(f), "--lab", "east")
        gateway = lab.topo.node("east", "n2")
        for i in range(args.failovers):
            ops.wait_for(lambda: leaves_through(lab, gateway), 120,
                         "the egress IP to route through east/n2", interval=0.2)
            ready = first_answer(ns, EGRESS_IP)
            ready.wait(130)
            if ready.returncode != 0:
                raise SystemExit("the pod does not reach plx-ext with the egress IP")
            agent = State.load(lab.state_path).processes[f"agent-{gateway.key}"]
            ops.run("ip", "-n", gateway.host.netns, "link", "set", "eth0", "down")
            killed = time.time()
            probe = first_answer(ns, EGRESS_IP)
            ops.stop(agent.pid, agent.marker, timeout=5)
            out, _ = probe.communicate(timeout=130)
            if probe.returncode != 0:
                raise SystemExit(f"failover {i}: no new connection through the standby")
            took.append(float(out) - killed)
            print(f"failover {i + 1}: {took[-1]:.3f}s", flush=True)
            ops.run("ip", "-n", gateway.host.netns, "link", "set", "eth0", "up")
            # the link going down took the default route with it
            ops.run("ip", "-n", gateway.host.netns, "route", "replace", "default", "via",
                    gateway.host.segment.gateway)
            lab.start(f"agent-{gateway.key}")
    finally:
        plexus("lab", "down")
    took.sort()
    p99 = took[min(len(took) - 1, round(0.99 * (len(took) - 1)))]
    print(f"machine: {machine()}")
    print(json.dumps({"failovers": len(took), "p50_s": round(statistics.median(took), 3),
                      "p99_s": round(p99, 3), "max_s": round(took[-1], 3)}))
    print(f"rerun: .venv/bin/python -m bench.egress.failover --failovers {args.failovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

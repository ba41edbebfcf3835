"""Egress policy change in the lab: a pod added with a label a policy selects -> its traffic
leaves through the gateway (`plx-ext` sees the egress IP), end to end.

    .venv/bin/python -m bench.egress.steer [--pods 20]

The package takes the machine lock itself (bench/__init__.py): do not wrap it in flock.

Brings the lab up (and down at the end) and applies a policy (gateway east/n2) selecting
`app=egsteer`. Each round adds a pod with that label on east/n1. A prober, started before the
pod and entering the pod's namespace as soon as it exists, opens a new connection to
`plx-ext` every 5 ms (each in its own thread); timed: from the first connection answered
at all (the pod's network is up: its CNI ADD has wired it) to the first answered with the
egress IP. Until then connections leave as any pod's do, with the pod's own address: what is
timed is the pod's endpoint going through its cluster's apiserver (identity, ipcache) to the
agent, the egress module's selection and the steering map. Target p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, percentile
from bench.egress.failover import EGRESS_IP, EXT_IP, plexus
from plexus.lab.external import PORT
from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns

POLICY = """apiVersion: plexus.io/v1
kind: EgressGatewayPolicy
metadata: {name: bench-steer}
spec:
  selectors:
  - podSelector: {matchLabels: {app: egsteer}}
  destinationCIDRs: [198.51.100.0/24]
  egressIP: 10.255.0.10
  egressGateways:
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: east}}
"""
# Waits for the pod's namespace, enters it (setns: nothing is sent before), then a new
# connection every 5 ms until one is answered with `want`; prints when (wall clock) that was,
# and how many were answered with another address before.
PROBE = """import ctypes, json, os, socket, sys, threading, time
path, ip, port, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + 60
while not os.path.exists(path):
    if time.monotonic() > deadline:
        sys.exit(2)
    time.sleep(0.001)
fd = os.open(path, os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
    sys.exit(3)
answered, took, other, first = threading.Event(), [], [], []
def attempt():
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            seen = json.loads(s.makefile().readline()).get("ip")
    except (OSError, ValueError):
        return
    first.append(time.time())
    if seen == want:
        took.append(time.time())
        answered.set()
    else:
        other.append(seen)
while not answered.is_set() and time.monotonic() < deadline:
    threading.Thread(target=attempt, daemon=True).start()
    answered.wait(0.005)
print(json.dumps({"at": min(took) if took else None, "first": min(first) if first else None,
                  "before": len(other)}))
sys.exit(0 if took else 1)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pods", type=int, default=20)
    args = p.parse_args()
    if Path("/var/run/netns/plx-router").exists():
        raise SystemExit("a lab is up: `plexus lab down` first")
    plexus("lab", "up")
    took: list[float] = []
    direct: list[int] = []
    try:
        lab = Lab(say=lambda _l: None)
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "policy.yaml"
            f.write_text(POLICY)
            plexus("apply", "-f", str(f), "--lab", "east")
        node = lab.topo.node("east", "n1")
        for i in range(args.pods):
            name = f"egsteer{i}"
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, f"/run/netns/{pod_netns(node, name)}", EXT_IP,
                 str(PORT), EGRESS_IP], stdout=subprocess.PIPE, text=True)
            try:
                lab.pod_add("east", "n1", name, {"app": "egsteer"})
                out, _ = probe.communicate(timeout=90)
            finally:
                if probe.poll() is None:
                    probe.kill()
                    probe.wait()
            if probe.returncode != 0:
                raise SystemExit(f"pod {name}: never left with the egress IP (probe {probe.returncode})")
            r = json.loads(out)
            took.append(r["at"] - r["first"])
            direct.append(r["before"])
            print(f"pod {i + 1}: steered {took[-1] * 1000:.1f} ms after its first connection "
                  f"({r['before']} left with its own address before)", flush=True)
    finally:
        plexus("lab", "down")
    print(f"machine: {machine()}")
    print(json.dumps({"pods": len(took), "p50_ms": round(statistics.median(took) * 1000, 1),
                      "p99_ms": round(percentile(took, 99) * 1000, 1),
                      "max_ms": round(max(took) * 1000, 1), "target_p99_ms": 100}))
    print(f"rerun: .venv/bin/python -m bench.egress.steer --pods {args.pods}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

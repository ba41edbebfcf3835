"""Egress gateway throughput and latency: through the gateway (steering, VXLAN, SNAT) next to
the same path without the policy, in one run.

    .venv/bin/python -m bench.egress.throughput [--rounds 3] [--seconds 5] [--pings 100]

The package takes the machine lock itself (bench/__init__.py): do not wrap it in flock.

The path of tests/egress_fixture.py in namespaces, no agent: pod -> source node -> gateway
node -> external server, each node's datapath loaded and attached; the pod's MTU is 1500
and the nodes' links 1600, so the tunnel carries whole 1500-byte packets. Each round
measures, in turn (the order alternates), iperf3 TCP from the pod to the external server
with 1500-byte packets (the pod's segmentation offload off) and TCP connect latency
(connection set up and one line answered, the external server's), with:
  direct    no entries: the pod leaves through the gateway node routed, untranslated;
  gateway   the pod selected: steered into the tunnel to the gateway and translated there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench.common import machine, percentile
from bpf.egress import SnatEntry, SteeringEntry
from tests.egress_fixture import EGRESS_IP, EXT, GATEWAY_NODE, SOURCE_NODE, Lab, egress_path
from tests.support import sh, stop_pid

DEST = "198.51.100.0/24"
# n connections, each: connect, read the server's line; prints the times in ms
CONNECTS = """import json, socket, sys, time
out = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
        s.makefile().readline()
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""


def select(lab: Lab, on: bool) -> None:
    ip = lab.pods["a"][1]
    if on:
        lab.steering.steering_set(SteeringEntry(ip, DEST, GATEWAY_NODE))
        lab.snat.snat_set(SnatEntry(ip, DEST, EGRESS_IP, source_node=SOURCE_NODE))
    else:
        lab.steering.steering_delete(ip, DEST)
        lab.snat.snat_delete(ip, DEST)


def iperf(lab: Lab, seconds: int) -> float:
    r = sh("iperf3", "-c", EXT, "-t", str(seconds), "-J", ns=lab.pods["a"][0],
           timeout=seconds + 30)
    return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def connects(lab: Lab, n: int) -> list[float]:
    r = sh(sys.executable, "-c", CONNECTS, EXT, "8080", str(n), ns=lab.pods["a"][0], timeout=120)
    times: list[float] = json.loads(r.stdout)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--pings", type=int, default=100)
    args = p.parse_args()
    gbps: dict[str, list[float]] = {"direct": [], "gateway": []}
    lat: dict[str, list[float]] = {"direct": [], "gateway": []}
    with egress_path(pod_mtu=1500, underlay_mtu=1600) as lab:
        sh("ethtool", "-K", "eth0", "tso", "off", "gso", "off", ns=lab.pods["a"][0])
        server = subprocess.Popen(["ip", "netns", "exec", lab.ext, "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # iperf3 -s has no readiness signal; the first client retries
            for rnd in range(args.rounds):
                order = ["direct", "gateway"] if rnd % 2 == 0 else ["gateway", "direct"]
                for mode in order:
                    select(lab, mode == "gateway")
                    seen = json.loads(sh(sys.executable, "-c", "import socket, sys; s = socket."
                                         "create_connection((sys.argv[1], 8080)); "
                                         "print(s.makefile().readline())", EXT,
                                         ns=lab.pods["a"][0]).stdout)["ip"]
                    want = EGRESS_IP if mode == "gateway" else lab.pods["a"][1]
                    if seen != want:
                        raise SystemExit(f"{mode}: the server saw {seen}, not {want}")
                    gbps[mode].append(iperf(lab, args.seconds))
                    lat[mode].extend(connects(lab, args.pings))
        finally:
            stop_pid(server)
    print(f"machine: {machine()}")
    print(f"{'path':<10} {'Gb/s (median)':>14} {'connect+answer p50':>19} {'p99':>9}")
    for mode in ("direct", "gateway"):
        print(f"{mode:<10} {statistics.median(gbps[mode]):>14.2f} "
              f"{percentile(lat[mode], 50):>16.3f} ms {percentile(lat[mode], 99):>6.3f} ms")
    ratio = statistics.median(gbps["gateway"]) / statistics.median(gbps["direct"])
    print(f"gateway / direct throughput: {ratio:.2f}")
    print(f"rerun: .venv/bin/python -m bench.egress.throughput --rounds {args.rounds} "
          f"--seconds {args.seconds} --pings {args.pings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Visibility across the lab: flows per second east's relay merges from every node, and the
delay from a packet to its row in the web page (headless Chromium), p50 and p99.

    .venv/bin/python -m bench.visibility.relay [--rate 2000] [--seconds 5] [--syns 200]

Uses the lab as it is (`plexus lab up` first when it is not up, and `lab down` after). On every
node a target pod whose policy admits nobody and a sender pod next to it.

merge: every sender sends UDP to its target at `--rate` packets/s for `--seconds` at once; each
       packet is a denied verdict on the target's node. The relay's count of flows received,
       its flows/s and the events nodes lost are read before and after.
delay: the page is opened on east's relay with the CLI's filters `--verdict DROPPED --protocol
       tcp`; senders take turns opening TCP connections to their targets (one SYN each, every
       one denied), 20 a second. For each red row a MutationObserver notes when it appeared;
       the delay is that minus the flow's own time (when the datapath saw the packet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import machine, percentile
from bpf.flows import parse_time
from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns
from tests.e2e.labs import apply_in, lab_namespaces, plexus
from tests.e2e.test_visibility import RELAY_URL, browser
from tests.support import wait_until

POLICY = """apiVersion: plexus.io/v1
kind: PlexusNetworkPolicy
metadata: {name: btarget-admits-nobody, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: btarget}}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: nobody}
"""

FLOOD = r"""
import socket, sys, time
ip, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40000))
sent, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while sent < due:
        s.sendto(b"x", (ip, 7000 + sent % 20))
        sent += 1
    time.sleep(0.001)
print(sent)
"""

SYN = r"""
import socket, sys
s = socket.socket()
s.settimeout(0.2)
try:
    s.connect((sys.argv[1], 9090))
except OSError:
    pass
"""

SYNS = r"""
import collections, socket, sys, time
ip, count, interval, offset = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
open_ = collections.deque()
start = time.monotonic() + offset
for i in range(count):
    time.sleep(max(0.0, start + i * interval - time.monotonic()))
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((ip, 9090))  # one SYN; closed before the kernel would send it again
    open_.append((time.monotonic(), s))
    while open_ and time.monotonic() - open_[0][0] > 0.3:
        open_.popleft()[1].close()
time.sleep(0.3)
"""

OBSERVE_ROWS = """
window.delays = [];
new MutationObserver(ms => {
  const at = performance.timeOrigin + performance.now();
  for (const m of ms) for (const n of m.addedNodes)
    if (n.nodeType === 1 && n.dataset && n.dataset.verdict === 'DROPPED')
      window.delays.push([at, n.dataset.time]);
}).observe(document.getElementById('flows'), {childList: true});
"""


def status() -> dict[str, Any]:
    r = plexus("relay", "status", "--lab", "east", "-o", "json")
    st: dict[str, Any] = json.loads(r.stdout)
    return st


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=2000, help="packets/s per sender (default %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--syns", type=int, default=200)
    args = p.parse_args()
    brought_up = not lab_namespaces()
    if brought_up:
        r = plexus("lab", "up")
        if r.returncode != 0:
            raise SystemExit(r.stdout + r.stderr)
    lab = Lab(say=lambda _line: None)
    try:
        run(lab, args)
    finally:
        made = {(info["cluster"], info["node"], info["pod"]) for info in lab.pods().values()}
        for i, n in enumerate(lab.topo.nodes()):
            for pod in (f"bt{i}", f"bs{i}"):
                if (n.cluster, n.name, pod) in made:
                    lab.pod_del(n.cluster, n.name, pod)
        if brought_up:
            plexus("lab", "down")
    print("rerun: .venv/bin/python -m bench.visibility.relay " + " ".join(sys.argv[1:]))


def run(lab: Lab, args: argparse.Namespace) -> None:
    print(f"# machine: {machine()}")
    pairs = []
    for i, n in enumerate(lab.topo.nodes()):
        target = lab.pod_add(n.cluster, n.name, f"bt{i}", {"app": "btarget"})
        lab.pod_add(n.cluster, n.name, f"bs{i}", {"app": "bsender"})
        pairs.append((pod_netns(n, f"bs{i}"), target["ip"]))
    with tempfile.TemporaryDirectory() as tmp:
        for cluster in ("east", "west"):
            r = apply_in(cluster, POLICY, Path(tmp))
            assert r.returncode == 0, r.stderr
    wait_until(lambda: status()["connected"] == 4, 30, what="the relay connected to every node")
    # the policy is in force everywhere once a SYN to each target is seen dropped
    for ns, ip in pairs:
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SYN, ip], check=True)

    # ---- merge --------------------------------------------------------------------------
    before = status()
    lost_before = sum(n["lost"] for n in before["nodes"])
    senders = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", FLOOD, ip, str(args.rate),
                                 str(args.seconds)], stdout=subprocess.PIPE, text=True) for ns, ip in pairs]
    t0 = time.monotonic()
    rates = []
    while any(s.poll() is None for s in senders):
        time.sleep(1)
        rates.append(status()["flowsPerSecond"])
    sent = sum(int(s.communicate()[0]) for s in senders)
    wait_until(lambda: status()["flows"] - before["flows"] >= sent, 60, interval=0.2)
    elapsed = time.monotonic() - t0
    after = status()
    received = after["flows"] - before["flows"]
    lost = sum(n["lost"] for n in after["nodes"]) - lost_before
    print(f"merge: 4 nodes x {args.rate}/s for {args.seconds}s: {sent} packets sent, {received} flows "
          f"merged in {elapsed:.1f}s ({received / elapsed:.0f} flows/s until the relay had them all; "
          f"its own peak reading {max(rates, default=0):.0f}/s), {lost} lost at nodes, "
          f"{after['late'] - before['late']} passed on after newer ones")

    # ---- delay to the browser --------------------------------------------------------------
    # the same flows through the CLI's stream, each line stamped when it is read; started
    # first, so it follows before the first SYN
    cli = subprocess.Popen([sys.executable, "-m", "plexus", "observe", "--lab", "east", "-f", "--last",
                            "0", "--verdict", "DROPPED", "--protocol", "tcp", "--to-label",
                            "app=btarget", "-o", "json"], stdout=subprocess.PIPE, text=True)
    cli_delays: list[float] = []

    def read_cli() -> None:
        assert cli.stdout is not None
        for line in cli.stdout:
            cli_delays.append(time.time() - parse_time(json.loads(line)["flow"]["time"]) / 1e9)

    reader = threading.Thread(target=read_cli, daemon=True)
    reader.start()
    with browser("plx-east-cp") as driver:
        driver.get(RELAY_URL)
        box = driver.find_element("id", "filter")
        box.send_keys("--verdict DROPPED --protocol tcp --to-label app=btarget")
        driver.find_element("id", "apply").click()
        time.sleep(1.5)  # the page's history of earlier drops arrives first: not measured
        driver.execute_script(OBSERVE_ROWS)
        per_pod = args.syns // len(pairs)
        syns = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SYNS, ip, str(per_pod),
                                  str(len(pairs) / 20), str(i / 20)]) for i, (ns, ip) in enumerate(pairs)]
        for s in syns:
            s.wait(120)
        total = per_pod * len(pairs)
        wait_until(lambda: len(driver.execute_script("return window.delays")) >= total, 30,
                   interval=0.2, what="every SYN's row")
        wait_until(lambda: len(cli_delays) >= total, 10, interval=0.2, what="every SYN's line")
        got = driver.execute_script("return window.delays")
        cli.terminate()
        cli.wait(10)
    delays = [at / 1000 - parse_time(t) / 1e9 for at, t in got]
    for what, ds in (("browser (page row)", delays), ("CLI stream (plexus observe -f)", cli_delays)):
        print(f"delay packet -> {what} over {len(ds)} drops at 20/s: p50 {percentile(ds, 50) * 1000:.0f} ms, "
              f"p99 {percentile(ds, 99) * 1000:.0f} ms, max {max(ds) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

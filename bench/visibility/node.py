"""Visibility on one node: how many flows per second it records and serves without loss, and
what observing costs the traffic.

    .venv/bin/python -m bench.visibility.node [--seconds 3] [--rounds 3]

Two pods on one node with the real datapath loaded by the bpf module (tests/flows_fixture.py),
a reader following every flow as the relay does (`FlowRing.observe(follow=True)`).

rate: the client sends UDP to a port web's policy denies, paced at a rising rate; each packet
      is a verdict event (denied packets make no conntrack entry), enriched and kept in the
      ring. A rate is lossless when the kernel lost no event and the reader missed no flow.
cost: iperf3 TCP client -> web, and new TCP connections per second (each one two flows: the
      client's egress and web's ingress verdict), with observation on (flows read, kept and
      followed) and off (nobody reads the buffer: the kernel overwrites it), side by side in
      alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import machine
from bpf.flows import FlowFilter
from bpf.module import BpfDatapath
from tests.flows_fixture import WEB, flow_node
from tests.support import eventually, stop_pid

PACED = r"""
import socket, sys, time
ip, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
batch = max(1, rate // 1000)
sent, start = 0, time.monotonic()
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = int(now * rate)
    while sent < due:
        for _ in range(batch):
            s.sendto(b"x", (ip, 7000 + sent % 50))
            sent += 1
    time.sleep(0.0005)
print(sent)
"""

CONNECTS = r"""
import socket, struct, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
linger = struct.pack("ii", 1, 0)  # closed with a reset: no TIME_WAIT to run out of ports
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    c = socket.create_connection((ip, port), timeout=2)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    c.close()
    n += 1
print(n / seconds)
"""

ACCEPT = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


def start_acceptor(ns: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ACCEPT],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def in_pod(ns: str, *argv: str, timeout: float = 60) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[:3]} in {ns}: {r.stderr.strip()[-300:]}")
    return r.stdout


async def follow_all(module: BpfDatapath, stop: asyncio.Event) -> int:
    """A reader of every flow, as the relay is; returns how many it read."""
    read = [0]

    async def consume() -> None:
        async for _doc in module.ring.observe(FlowFilter(), last=0, follow=True):
            read[0] += 1

    task = asyncio.ensure_future(consume())
    await stop.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return read[0]


async def rate_round(module: BpfDatapath, pods: dict[str, str], rate: int, seconds: float) -> dict[str, Any]:
    ring = module.ring
    seen0, lost0, slow0 = ring.seen, ring.lost_perf, ring.lost_readers
    stop = asyncio.Event()
    reader = asyncio.ensure_future(follow_all(module, stop))
    await asyncio.sleep(0.1)
    sent = int(await asyncio.to_thread(in_pod, pods["client"], sys.executable, "-c", PACED, WEB,
                                       str(rate), str(seconds)))
    # what was sent is read once the poller caught up (or counted lost)
    try:
        await eventually(lambda: ring.seen + ring.lost_perf - seen0 - lost0 >= sent, 10)
    except AssertionError:
        pass
    await asyncio.sleep(0.3)
    stop.set()
    read = await reader
    seen, lost, slow = ring.seen - seen0, ring.lost_perf - lost0, ring.lost_readers - slow0
    return {"target": rate, "sent": sent, "achieved": round(sent / seconds), "recorded": seen,
            "lostKernel": lost, "lostReader": slow, "read": read,
            "lossless": lost == 0 and slow == 0 and seen >= sent}


def iperf(pods: dict[str, str], seconds: float) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", pods["web"], "iperf3", "-s", "-B", WEB, "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = subprocess.run(["ip", "netns", "exec", pods["client"], "iperf3", "-c", WEB, "-t",
                                str(seconds), "-J"], capture_output=True, text=True)
            doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
            if r.returncode == 0 and "sum_received" in doc.get("end", {}):
                return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.2)  # the server not listening yet, or still busy with the last test
        raise RuntimeError(f"iperf3 failed: {r.stdout[-300:]} {r.stderr[-300:]}")
    finally:
        stop_pid(srv)


async def set_observing(module: BpfDatapath, on: bool) -> None:
    polling = any(t.name == "bpf-flows" for t in threading.enumerate())
    if on and not polling:
        module.start_polling()
    elif not on and polling:
        module._polling.clear()
        await eventually(lambda: not any(t.name == "bpf-flows" for t in threading.enumerate()), 5)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with flow_node(Path(tmp), ring=4096, pages=64) as (module, pods, _ifs):
            print(f"# machine: {machine()}")
            print(f"# rate: paced denied UDP for {args.seconds}s per step, a reader following every flow")
            print(f"{'target/s':>9} {'sent/s':>8} {'recorded':>9} {'lost(kernel)':>13} "
                  f"{'lost(reader)':>13} {'lossless':>8}")
            best = 0
            for rate in args.rates:
                r = await rate_round(module, pods, rate, args.seconds)
                print(f"{r['target']:>9} {r['achieved']:>8} {r['recorded']:>9} {r['lostKernel']:>13} "
                      f"{r['lostReader']:>13} {r['lossless']!s:>8}", flush=True)
                if r["lossless"]:
                    best = max(best, r["achieved"])
            print(f"lossless flows/s (highest step): {best}")

            server = start_acceptor(pods["web"])
            try:
                results: dict[str, dict[str, list[float]]] = {"on": {"gbps": [], "cps": []},
                                                              "off": {"gbps": [], "cps": []}}
                for rnd in range(args.rounds):
                    for mode in (("on", "off") if rnd % 2 == 0 else ("off", "on")):
                        await set_observing(module, mode == "on")
                        gbps = await asyncio.to_thread(iperf, pods, args.seconds)
                        cps = float(await asyncio.to_thread(in_pod, pods["client"], sys.executable, "-c",
                                                            CONNECTS, WEB, "8080", str(args.seconds)))
                        results[mode]["gbps"].append(gbps)
                        results[mode]["cps"].append(cps)
                        print(f"round {rnd + 1} observation {mode:>3}: iperf3 {gbps:6.2f} Gb/s, "
                              f"{cps:7.0f} new connections/s", flush=True)
                await set_observing(module, True)
            finally:
                stop_pid(server)
            med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in results.items()}
            print(f"median over {args.rounds} rounds: iperf3 on {med['on']['gbps']:.2f} / off "
                  f"{med['off']['gbps']:.2f} Gb/s = {med['on']['gbps'] / med['off']['gbps']:.3f}; "
                  f"new connections/s on {med['on']['cps']:.0f} / off {med['off']['cps']:.0f} = "
                  f"{med['on']['cps'] / med['off']['cps']:.3f}")
    print("rerun: .venv/bin/python -m bench.visibility.node " + " ".join(sys.argv[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rates", type=int, nargs="+", default=[2000, 5000, 10000, 20000, 40000, 80000])
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()

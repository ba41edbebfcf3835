"""Restarts at scale: ExaBGP killed, or the agent restarted, with N routes announced, and
BIRD, FRR and GoBGP as the router, side by side.

Run (root, from the repo root; takes the machine lock):
    .venv/bin/python -m bench.bgp.restart [--sizes 10000,100000] [--routers bird,frr,gobgp]
        [--restarts exabgp-killed,agent-restarted] [--graceful]

The agent is the BGP module (bgp/module.py) with N services to announce, its ExaBGP in the
node namespace of tests/bgp_lab.py. Once the router holds all N, the restart happens at t0:
ExaBGP killed (the agent starts another), or the agent stopped and a new one started (its
tables filled before t0, its route computation after). Figures from t0:

- established: the new session is up (ExaBGP's own report to the agent);
- last_route: the last UPDATE announcing a route left the node (tcpdump in the node's
  namespace);
- eor: End-of-RIB left the node; eor_after_routes says it came after every route UPDATE;
- all: the router holds all N again. Without --graceful the router runs no graceful
  restart, drops every route with the session and so counts the new session's routes;
  with --graceful it keeps them stale, and `fewest` is the fewest routes it held meanwhile
  (N when none was lost). The router is read every few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bgp.tables import IPAddress
from tests.bgp_lab import NODE_IP, ROUTER_ASN, ROUTER_IP, Lab, bgp_lab
from tests.bgp_routers import Router, start_router
from tests.bgp_wire import Capture
from tests.privileged.test_bgp_router import Agent, cluster_config, service
from tests.privileged.test_bgp_routers import ADVERTS, LOCAL, peer_config

FIRST = int(ipaddress.ip_address("10.100.0.0"))
PEER: IPAddress = ipaddress.ip_address(ROUTER_IP)


class Sampler(threading.Thread):
    """(time, routes the router holds), over and over, until stopped."""

    def __init__(self, router: Router) -> None:
        super().__init__(name="rib-sampler", daemon=True)
        self.router = router
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            c = self.router.count()
            self.samples.append((time.time(), c))
            self._done.wait(0.005)

    def stop(self) -> None:
        self._done.set()
        self.join(60)


def agent(lab: Lab, n: int) -> Agent:
    """An agent with n services to announce (plus its pod CIDR), not started."""
    a = Agent(lab, Path(tempfile.mkdtemp(prefix="plexus-bench-", dir=lab.tmp)), LOCAL)
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config("ipv4"), ADVERTS]:
        a.manifests.upsert(m)
    for i in range(n):
        a.services.upsert(service(f"s{i}", str(ipaddress.ip_address(FIRST + i)), bgp="yes"))
    return a


async def until(cond: Callable[[], object], limit: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(interval)


def up_since(a: Agent, t0: float) -> float | None:
    st = a.bgp.speaker.peers.get(PEER)
    return st.since if st is not None and st.state == "established" and st.since > t0 else None


async def run(n: int, kind: str, restart: str, graceful: bool, limit: float) -> dict[str, float]:
    want = n + 1  # the services and the pod CIDR
    with bgp_lab() as lab:
        router = start_router(lab, kind, graceful=graceful, hold=30)
        capture = Capture(lab)
        first = agent(lab, n)
        running = [first]
        try:
            await first.bgp.start()
            await until(lambda: router.count() == want, limit, "initial sync", 0.2)
            await until(lambda: first.bgp.peers()[0]["endOfRib"], limit, "initial End-of-RIB")
            second = agent(lab, n) if restart == "agent-restarted" else first
            sampler = Sampler(router)
            sampler.start()
            try:
                t0 = time.time()
                if restart == "exabgp-killed":
                    proc = first.bgp.speaker.proc
                    assert proc is not None
                    proc.kill()
                else:
                    await first.bgp.stop()
                    running.remove(first)
                    running.append(second)
                    await second.bgp.start()
                await until(lambda: up_since(second, t0) is not None, limit, "session back")
                t_est = up_since(second, t0) or 0.0
                await until(lambda: second.bgp.peers()[0]["endOfRib"], limit, "End-of-RIB")
                await until(lambda: any(t > t_est and c == want for t, c in sampler.samples), limit,
                            "router holds all")
                await until(lambda: len(capture.sessions(NODE_IP)) >= 2
                            and capture.sessions(NODE_IP)[-1].eor_after_routes(), 10, "capture", 0.2)
            finally:
                await asyncio.to_thread(sampler.stop)
        finally:
            for a in running:
                await a.bgp.stop()
        s = capture.sessions(NODE_IP)[-1]
        last_route = max(u.time for u in s.updates if u.announced)
        eor = min(u.time for u in s.updates if u.eor)
        after = [(t, c) for t, c in sampler.samples if t >= t0]
        if graceful:
            t_all = next(t for t, c in after if t > t_est and c == want)
        else:  # the first time the router holds all after having lost them with the session
            lost = next((i for i, (_, c) in enumerate(after) if c < want), 0)
            t_all = next(t for t, c in after[lost:] if c == want)
        return {"established": t_est - t0, "last_route": last_route - t0, "eor": eor - t0,
                "all": t_all - t0, "fewest": min(c for _, c in after if c >= 0),
                "announced": len(s.announced()), "eor_after_routes": float(s.eor_after_routes()),
                "samples": len(after)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--routers", default="bird,frr,gobgp")
    ap.add_argument("--restarts", default="exabgp-killed,agent-restarted")
    ap.add_argument("--graceful", action="store_true", help="graceful restart on the router")
    ap.add_argument("--limit", type=float, default=300.0)
    a = ap.parse_args()
    from plexus.lab.ops import hold_machine_lock
    hold_machine_lock()
    print(f"# kernel {subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}, "
          f"cmd: {' '.join(sys.argv)}", flush=True)
    for n in [int(x) for x in a.sizes.split(",")]:
        for restart in a.restarts.split(","):
            for kind in a.routers.split(","):
                try:
                    r = asyncio.run(run(n, kind, restart, a.graceful, a.limit))
                except TimeoutError as e:
                    print(f"N={n} router={kind} restart={restart}: timed out ({e}) after {a.limit}s",
                          flush=True)
                    continue
                print(f"N={n} router={kind} restart={restart} graceful={a.graceful} "
                      + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in r.items()), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()

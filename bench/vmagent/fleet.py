"""Many hosts joining the lab's east cluster at once, as the lab's real node agents see it.

    .venv/bin/python -m bench.vmagent.fleet [--hosts 100] [--lease 30]

The lab must be down to start; it is brought up, and down at the end. Each host is enrolled as
`plexus vm create` enrols one (its own etcd user, role and certificate, its spec), has its own
WireGuard key, and registers with its own certificate under its lease through the vmagent's
`Registration`; all of them in one process inside east's control-plane namespace, so what is
timed is etcd's, the apiserver's and the node agents' work, not Python's start-up per host.
Timed: from the first registration until every node agent of both clusters holds every host
in its datapath's ipcache and as a WireGuard peer. Then each node agent's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import ROOT, machine, percentile, rss_mb
from clustermesh.kvstore import KvStore, Tls
from encryption.keys import KeyPair
from plexus.commands.common import LAB_DIR
from plexus.core.client import Client
from plexus.lab.lab import Lab, State
from vmagent import enrol
from vmagent.bundle import cert_serial
from vmagent.registration import Registration


def host_ip(i: int) -> str:
    # a segment no lab host sits on: nothing is ever sent to these addresses
    return f"172.31.9.{1 + i}"


def node_view(socket: Path) -> tuple[set[str], set[str]]:
    """A node agent's datapath ipcache (host prefixes) and its WireGuard peers' node names."""
    c = Client(socket, timeout=10)
    ipcache = {e["prefix"].split("/")[0] for e in c.get("/v1/bpf/ipcache")}
    peers = {p["node"] for p in c.get("/v1/encryption/status")["peers"]}
    return ipcache, peers


async def inner(hosts: int, lease: int, sockets: list[Path]) -> dict[str, object]:
    """In east's control-plane namespace: enrol, register all at once, watch every node."""
    pki = LAB_DIR / "pki" / "east"
    endpoint = "https://127.0.0.1:2379"
    admin_kv = KvStore([endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"),
                       timeout=30)
    admin = enrol.ClusterAdmin("east", admin_kv, pki, [endpoint])
    work = Path(tempfile.mkdtemp(prefix="plexus-bench-fleet-"))
    regs: list[Registration] = []
    kvs: list[KvStore] = [admin_kv]
    tasks: list[asyncio.Task[None]] = []
    try:
        started = time.monotonic()
        for i in range(hosts):
            b = await enrol.create(admin, f"f{i}", host_ip(i), {"app": "fleet", "n": str(i)},
                                   lease=lease, ttl=datetime.timedelta(hours=1))
            d = work / f"f{i}"
            d.mkdir()
            for name in ("ca", "cert", "key"):
                (d / name).write_text(getattr(b.etcd, name))
                os.chmod(d / name, 0o600)
            kv = KvStore([endpoint], Tls(d / "ca", d / "cert", d / "key"), timeout=30)
            kvs.append(kv)
            regs.append(Registration(kv, "east", f"f{i}", lease, cert_serial(b),
                                     partial(str, KeyPair.generate().public_b64)))
        enrolled = time.monotonic() - started
        want_ips = {host_ip(i) for i in range(hosts)}
        want_peers = {f"east/f{i}" for i in range(hosts)}
        t0 = time.monotonic()
        tasks = [asyncio.create_task(r.run()) for r in regs]
        done: dict[str, float] = {}
        deadline = t0 + 120
        while len(done) < len(sockets) and time.monotonic() < deadline:
            for s in sockets:
                if str(s) in done:
                    continue
                ipcache, peers = await asyncio.to_thread(node_view, s)
                if want_ips <= ipcache and want_peers <= peers:
                    done[str(s)] = time.monotonic() - t0
            await asyncio.sleep(0.1)
        errors = sum(1 for r in regs if r.status.state != "joined")
        return {"enrolled": enrolled, "nodes": done, "errors": errors, "all": len(done) == len(sockets)}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for kv in kvs:
            await kv.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hosts", type=int, default=100)
    p.add_argument("--lease", type=int, default=30)
    p.add_argument("--inner", nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner is not None:
        result = asyncio.run(inner(args.hosts, args.lease, [Path(s) for s in args.inner]))
        print(json.dumps(result))
        return 0
    if Path("/var/run/netns/plx-router").exists():
        raise SystemExit("a lab is up: `plexus lab down` first")
    plx = [sys.executable, "-m", "plexus"]
    subprocess.run([*plx, "lab", "up"], cwd=ROOT, check=True, capture_output=True)
    try:
        lab = Lab(say=lambda _l: None)
        nodes = list(lab.topo.nodes())
        sockets = [str(lab.socket(n)) for n in nodes]
        cp = lab.topo.cluster("east").control_plane.netns
        r = subprocess.run(["ip", "netns", "exec", cp, sys.executable, "-m", "bench.vmagent.fleet",
                            "--hosts", str(args.hosts), "--lease", str(args.lease), "--inner",
                            *sockets], cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            raise SystemExit(f"the fleet failed:\n{r.stdout}{r.stderr}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        procs = State.load(lab.state_path).processes
        rss = {n.key: rss_mb(procs[f"agent-{n.key}"].pid) for n in nodes}
    finally:
        subprocess.run([*plx, "lab", "down"], cwd=ROOT, check=False, capture_output=True)
    times = sorted(result["nodes"].values())
    print(f"machine: {machine()}")
    print(f"{args.hosts} hosts enrolled (user, role, certificate, spec each) in {result['enrolled']:.1f} s")
    print(f"{args.hosts} hosts joining at once -> every one in the datapath ipcache and the "
          f"WireGuard peers of every node agent of both clusters: "
          + (f"{times[-1]:.2f} s (first node {times[0]:.2f} s, p50 {percentile(times, 50):.2f} s)"
             if result["all"] else f"NOT within 120 s ({len(times)} of {len(nodes)} nodes)")
          + f"; hosts not joined: {result['errors']} (target < 30 s, no errors)")
    print("node agents' RSS with them: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    print(f"rerun: .venv/bin/python -m bench.vmagent.fleet --hosts {args.hosts} --lease {args.lease}")
    return 0 if result["all"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

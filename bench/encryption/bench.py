"""Encryption benchmarks: configuring WireGuard peers, and throughput encrypted vs plain.

    .venv/bin/python -m bench.encryption.bench peers [--peers 1000] [--changes 200]
    .venv/bin/python -m bench.encryption.bench throughput [--seconds 5]

`peers` drives the agent's own reconciler and wireguard-go backend, next to `wg syncconf`
of the same configuration (the floor). `throughput` runs iperf3 between two namespaces,
plain and through wireguard-go tunnels set up by the agent's backend.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import machine, percentile
from encryption.keys import KeyPair
from encryption.ops import PeerOps, UserspaceBackend
from encryption.tables import Peer, peers_table
from plexus.core.reconciler import Reconciler
from tests.support import sh, unique

WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


def _peer(i: int, key: bytes, extra: int = 0) -> Peer:
    node_ip = str(ipaddress.ip_address("100.64.0.0") + i + 1)
    cidr = f"10.{(i >> 8) & 0xFF}.{i & 0xFF}.0/24"
    allowed = (cidr, f"{node_ip}/32") + ((f"10.250.{extra % 250}.0/24",) if extra else ())
    return Peer(("bench", f"n{i}"), key, node_ip, 51871, allowed)


def _syncconf_text(private: KeyPair, peers: list[Peer]) -> str:
    import base64

    lines = ["[Interface]", f"PrivateKey = {base64.b64encode(private.private_bytes).decode()}",
             "ListenPort = 51871", ""]
    for p in peers:
        lines += ["[Peer]", f"PublicKey = {base64.b64encode(p.public_key).decode()}",
                  f"Endpoint = {p.endpoint}:{p.port}", f"AllowedIPs = {', '.join(p.allowed_ips)}", ""]
    return "\n".join(lines)


class Device:
    """A wireguard-go device in a fresh namespace, gone afterwards."""

    def __init__(self, name: str) -> None:
        self.ns = unique("plx-tw")
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="plexus-bench-wg-"))

    def __enter__(self) -> Device:
        sh("ip", "netns", "add", self.ns)
        self.backend = UserspaceBackend(self.name, self.dir)
        self.keys = KeyPair.generate()
        # wireguard-go must start inside the namespace: run its start from there
        subprocess.run(["ip", "netns", "exec", self.ns, "python3", "-c", "pass"], check=True)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "wireguard-go", "-f", self.name],
                                     env={**WG_ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.backend.uapi.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.02)
        self.backend.uapi.set_device(self.keys.private_bytes, 51871)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.backend.uapi.path.unlink(missing_ok=True)
        sh("ip", "netns", "del", self.ns, check=False)

    def clear(self) -> None:
        for pub in list(self.backend.info().peers):
            self.backend.remove_peer(pub)

    def syncconf(self, text: str) -> float:
        conf = self.dir / "wg.conf"
        conf.write_text(text)
        t0 = time.perf_counter()
        sh("wg", "syncconf", self.name, str(conf), ns=self.ns)
        return time.perf_counter() - t0


async def _reconcile_all(dev: Device, peers: list[Peer], changes: int) -> tuple[float, list[float]]:
    table = peers_table()
    rec = Reconciler("bench-peers", table, PeerOps(dev.backend), prune_interval=3600, concurrency=4096)
    task = asyncio.create_task(rec.run())
    t0 = time.perf_counter()
    for p in peers:
        table.upsert(p)
    while not (rec.settled() and len(rec.applied) == len(peers)):
        await asyncio.sleep(0.001)
    full = time.perf_counter() - t0
    one: list[float] = []
    for n in range(changes):
        p = _peer(n % len(peers), peers[n % len(peers)].public_key, extra=n + 1)
        t0 = time.perf_counter()
        table.upsert(p)
        while not (rec.settled() and rec.applied.get(p.key) == p):
            await asyncio.sleep(0.0002)
        one.append(time.perf_counter() - t0)
    task.cancel()
    return full, one


def peers(args: argparse.Namespace) -> None:
    keys = [KeyPair.generate().public_bytes for _ in range(args.peers)]
    rows = [_peer(i, k) for i, k in enumerate(keys)]
    fulls, floor_fulls, one, floor_one = [], [], [], []
    with Device("plxtwbench0") as dev:
        for _ in range(args.rounds):  # interleaved, so both paths see the same machine load
            dev.clear()
            full, changes = asyncio.run(_reconcile_all(dev, rows, args.changes))
            assert len(dev.backend.info().peers) == args.peers
            fulls.append(full)
            one += changes
            dev.clear()
            floor_fulls.append(dev.syncconf(_syncconf_text(dev.keys, rows)))
            assert len(dev.backend.info().peers) == args.peers
            current = list(rows)
            for n in range(args.changes):
                current[n % len(rows)] = _peer(n % len(rows), keys[n % len(rows)], extra=n + 1)
                floor_one.append(dev.syncconf(_syncconf_text(dev.keys, current)))
    full, floor_full = statistics.median(fulls), statistics.median(floor_fulls)
    print(f"WireGuard peers on wireguard-go: {args.peers} peers, then {args.changes} single changes, "
          f"{args.rounds} interleaved rounds (medians); {machine()}")
    print(f"{'path':<46} {'all peers':>10} {'change p50':>11} {'change p99':>11}")
    ms = [x * 1000 for x in one]
    fms = [x * 1000 for x in floor_one]
    print(f"{'Plexus reconciler (UAPI, one peer per op)':<46} {full:>9.3f}s {percentile(ms, 50):>9.2f}ms "
          f"{percentile(ms, 99):>9.2f}ms")
    print(f"{'wg syncconf of the whole config (floor)':<46} {floor_full:>9.3f}s "
          f"{percentile(fms, 50):>9.2f}ms {percentile(fms, 99):>9.2f}ms")
    print(f"all peers per round: Plexus {', '.join(f'{x:.3f}' for x in fulls)} s; "
          f"floor {', '.join(f'{x:.3f}' for x in floor_fulls)} s")
    print(f"ratio to floor: all peers {full / floor_full:.2f}x, change p99 "
          f"{percentile(ms, 99) / percentile(fms, 99):.2f}x")
    print(f"rerun: .venv/bin/python -m bench.encryption.bench peers --peers {args.peers} "
          f"--changes {args.changes} --rounds {args.rounds}")


def _iperf(server_ns: str, client_ns: str, ip: str, seconds: float) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", ip],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", ip, "-t", str(seconds),
                                "-J"], capture_output=True, text=True)
            if r.returncode == 0:
                return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 failed: {r.stdout[-300:]}")
    finally:
        srv.kill()
        srv.wait()


def throughput(args: argparse.Namespace) -> None:
    a, b = unique("plx-tw"), unique("plx-tw")
    procs = []
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, "192.0.2.1"), (b, "192.0.2.2")):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        plain = _iperf(b, a, "192.0.2.2", args.seconds)
        keys = {}
        for ns, dev in ((a, "plxtwbencha"), (b, "plxtwbenchb")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", dev],
                                          env={**WG_ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            keys[ns] = KeyPair.generate()
        for ns, dev, inner, peer_ns, peer_ip, peer_inner in (
                (a, "plxtwbencha", "10.99.0.1", b, "192.0.2.2", "10.99.0.2"),
                (b, "plxtwbenchb", "10.99.0.2", a, "192.0.2.1", "10.99.0.1")):
            be = UserspaceBackend(dev, Path(tempfile.mkdtemp()))
            deadline = time.monotonic() + 10
            while not be.uapi.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            be.uapi.set_device(keys[ns].private_bytes, 51871)
            be.set_peer(Peer(("bench", peer_ns), keys[peer_ns].public_bytes, peer_ip, 51871,
                             (f"{peer_inner}/32",)))
            sh("ip", "-n", ns, "addr", "add", f"{inner}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "mtu", "1420", "up")
        encrypted = _iperf(b, a, "10.99.0.2", args.seconds)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        for dev in ("plxtwbencha", "plxtwbenchb"):
            Path(f"/var/run/wireguard/{dev}.sock").unlink(missing_ok=True)
        for ns in (a, b):
            sh("ip", "netns", "del", ns, check=False)
    print(f"iperf3 TCP between two namespaces over veth, {args.seconds:.0f} s each; {machine()}")
    print(f"  plain:                      {plain:6.2f} Gbit/s")
    print(f"  WireGuard (wireguard-go):   {encrypted:6.2f} Gbit/s   ratio {encrypted / plain:.3f}")
    print(f"rerun: .venv/bin/python -m bench.encryption.bench throughput --seconds {args.seconds:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("peers")
    a.add_argument("--peers", type=int, default=1000)
    a.add_argument("--changes", type=int, default=200)
    a.add_argument("--rounds", type=int, default=5)
    a.set_defaults(func=peers)
    b = sub.add_parser("throughput")
    b.add_argument("--seconds", type=float, default=5)
    b.set_defaults(func=throughput)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

"""Policy benchmarks: derivation per identity change, and etcd write -> policy map latency.

    .venv/bin/python -m bench.datapath.policy derive [--identities 10000] [--rules 100]
        [--endpoints 10] [--changes 200] [--full-runs 3]
    .venv/bin/python -m bench.datapath.policy latency [--identities 10000] [--rules 100]
        [--writes 200] [--gap 0.02]

The package takes the machine lock itself (bench/__init__.py).

derive: 10,000 identities of a remote cluster (and an ipcache entry for each), 100 ingress
rules in 10 policies, each naming the remote cluster and an app label, 10 local endpoints
every policy selects. One change is a remote identity that appears (matching one rule) or
vanishes. Measured at two levels on the same inputs:

  engine  bpf.policy.compute() over everything (what every change cost before) against
          bpf.resolver.Resolver.set_identity() + drain() (the entries that change);
  module  BpfDatapath.recompute() (policies parsed, ipcache rows and policy entries derived,
          tables replaced) against BpfDatapath.apply() of the one changed identity.

latency: a real `plexus agent` (clustermesh + bpf, datapath loaded with its maps pinned) in
a private network namespace, its own cluster's etcd and a remote cluster's, a local pod's
veth with the programs attached, the same identities and rules preloaded. Each write puts a
new identity into the remote etcd that one rule selects and is timed until its entry is in
the pinned policy map, as a separate process sees it with the bpf() syscall (polled every
0.2 ms). The floor is the bare etcd client watching the same prefix in another process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.common import machine, percentile, seed_cluster, start_agent
from bpf.models import PlexusNetworkPolicy
from bpf.policy import LocalEndpoint, compute
from bpf.resolver import Resolver
from clustermesh.kvstore import KvStore
from clustermesh.manifests import manifest_key
from clustermesh.models import (
    IDENTITIES_PREFIX,
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    Identity,
    IPIdentity,
    format_labels,
)
from plexus.core.config import parse
from plexus.core.manifests import Manifest
from plexus.core.node import Endpoint, LocalNode
from tests.bpf_fixture import bpf_module
from tests.support import etcd_server, sh, stop_pid, wait_until

ROOT = Path(__file__).resolve().parents[2]

WEST = 2 << 16
APPS = 200  # identities spread over 200 app labels; rule k names app-k


def policy_bodies(rules: int) -> list[dict[str, Any]]:
    per = 10
    out = []
    for p in range(max(1, -(-rules // per))):
        ingress = [{"fromEndpoints": [{"matchLabels": {"app": f"app-{k}", LABEL_CLUSTER: "west"}}],
                    "toPorts": [{"ports": [{"port": 8000 + k, "protocol": "TCP"}]}]}
                   for k in range(p * per, min(rules, (p + 1) * per))]
        out.append({"apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
                    "metadata": {"name": f"bench-{p}", "namespace": "default"},
                    "spec": {"endpointSelector": {"matchLabels": {"role": "server"}}, "ingress": ingress}})
    return out


def labels_of(i: int) -> tuple[str, ...]:
    return (f"k8s:app=app-{i % APPS}", f"k8s:{LABEL_CLUSTER}=west", f"k8s:{LABEL_NAMESPACE}=default")


def label_map(i: int) -> dict[str, str]:
    return {"app": f"app-{i % APPS}", LABEL_CLUSTER: "west", LABEL_NAMESPACE: "default"}


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def engine(args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    policies = {b["metadata"]["name"]: parse(PlexusNetworkPolicy, b, "bench")
                for b in policy_bodies(args.rules)}
    identities = {WEST + 256 + i: label_map(i) for i in range(args.identities)}
    endpoints = {f"c{e}": LocalEndpoint(f"plxbench{e}", f"10.1.1.{e + 2}",
                                        {"role": "server", LABEL_NAMESPACE: "default", LABEL_CLUSTER: "east"})
                 for e in range(args.endpoints)}
    res = Resolver()
    full = [timed(lambda: compute(policies.values(), identities, endpoints.values()))
            for _ in range(args.full_runs)]
    reset = [timed(lambda: res.reset(policies, identities, endpoints)) for _ in range(args.full_runs)]
    inc = []
    new = WEST + 256 + args.identities

    def change(labels: dict[str, str] | None) -> None:
        res.set_identity(new, labels)
        res.drain()

    for n in range(args.changes):  # appear (app-0: rule 0 selects it), vanish, appear, ...
        labels = label_map(0) if n % 2 == 0 else None
        inc.append(timed(lambda labels=labels: change(labels)))
    return [(f"compute(), all {len(res.entries())} entries (before)", full),
            ("Resolver.reset(), all entries", reset),
            ("Resolver.set_identity() + drain()", inc)]


def module(args: argparse.Namespace, workdir: Path) -> list[tuple[str, list[float]]]:
    dp, tables = bpf_module(workdir, LocalNode("east", 1, "n1", "172.31.1.11", "10.1.1.0/24"))
    eps, ipc, ids, mf = (tables[name] for name in ("endpoints", "ipcache", "identities", "manifests"))
    for b in policy_bodies(args.rules):
        mf.upsert(Manifest("east", "PlexusNetworkPolicy", "default", b["metadata"]["name"], b))
    for i in range(args.identities):
        ids.upsert(Identity(WEST + 256 + i, labels_of(i), cluster="west"))
        ipc.upsert(IPIdentity(f"10.{2 + (i >> 16)}.{(i >> 8) & 0xFF}.{i & 0xFF}", WEST + 256 + i,
                              host_ip="172.31.2.11", cluster="west"))
    for e in range(args.endpoints):
        eps.upsert(Endpoint(f"c{e}", f"10.1.1.{e + 2}", "default", f"server-{e}", {"role": "server"},
                            f"plxbench{e}"))
    new = WEST + 256 + args.identities
    full = []
    for n in range(args.full_runs):
        if n % 2:
            ids.upsert(Identity(new, labels_of(0), cluster="west"))
        else:
            ids.delete(new)
        full.append(timed(dp.recompute))
    inc = []
    for n in range(args.changes):
        if n % 2 == 0:
            ids.upsert(Identity(new + 1, labels_of(0), cluster="west"))
        else:
            ids.delete(new + 1)
        inc.append(timed(lambda: dp.apply({ids.name: {new + 1}})))
    return [(f"recompute(), all {len(dp.entries)} entries + {len(dp.ipcache)} ipcache rows", full),
            ("apply() of the one identity", inc)]


def derive(args: argparse.Namespace) -> None:
    print(f"Policy derivation per identity change: {args.identities} identities x {args.rules} rules, "
          f"{args.endpoints} local endpoints; {machine()}")
    print(f"{'level':<7} {'path':<54} {'runs':>5} {'p50 ms':>10} {'p99 ms':>9} {'max ms':>9}")
    with TemporaryDirectory(prefix="plexus-bench-") as tmp:
        for level, run in (("engine", partial(engine, args)), ("module", partial(module, args, Path(tmp)))):
            for name, ms in run():
                print(f"{level:<7} {name:<54} {len(ms):>5} {percentile(ms, 50):>10.3f} "
                      f"{percentile(ms, 99):>9.3f} {max(ms):>9.3f}")
    print(f"rerun: .venv/bin/python -m bench.datapath.policy derive --identities {args.identities} "
          f"--rules {args.rules} --endpoints {args.endpoints} --changes {args.changes} "
          f"--full-runs {args.full_runs}")


# ---- latency: remote etcd write -> policy map entry ------------------------------------

CLONE_NEWNET = 0x40000000
POLICY_KEY = struct.Struct("=IIHBB")  # struct policy_key of datapath.c
INGRESS, TCP = 1, 6
AGENT_LOG = Path(tempfile.gettempdir()) / "plexus-bench-policy-agent.log"

# A separate process reads the pinned policy map with the bare bpf() syscall (no bcc, no
# agent code): for each key on stdin it polls until the map holds it and answers the
# monotonic time it saw it (CLOCK_MONOTONIC is one clock for every process); "count" counts
# the map's entries.
POLLER = r"""
import ctypes, struct, sys, time
SYS_BPF, BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET = 321, 1, 4, 7  # x86_64
libc = ctypes.CDLL(None, use_errno=True)
path = ctypes.create_string_buffer(sys.argv[1].encode())
attr = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(path), 0, 0), 128)
fd = libc.syscall(SYS_BPF, BPF_OBJ_GET, attr, 128)
if fd < 0:
    sys.exit(f"BPF_OBJ_GET {sys.argv[1]}: errno {ctypes.get_errno()}")
value = ctypes.create_string_buffer(int(sys.argv[2]))

def count(key_size):
    prev, nxt, n = None, ctypes.create_string_buffer(key_size), 0
    while True:
        req = struct.pack("=IIQQ", fd, 0, ctypes.addressof(prev) if prev else 0, ctypes.addressof(nxt))
        if libc.syscall(SYS_BPF, BPF_MAP_GET_NEXT_KEY, ctypes.create_string_buffer(req, 24), 24) != 0:
            return n
        n += 1
        prev, nxt = nxt, ctypes.create_string_buffer(key_size)

print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("count"):
        print(count(int(line.split()[1])), flush=True)
        continue
    hexkey, timeout = line.split()
    key = ctypes.create_string_buffer(bytes.fromhex(hexkey))
    req = ctypes.create_string_buffer(struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key),
                                                  ctypes.addressof(value), 0), 32)
    deadline = time.monotonic() + float(timeout)
    while libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, req, 32) != 0:
        if time.monotonic() > deadline:
            print("none", flush=True)
            break
        time.sleep(0.0002)
    else:
        print(repr(time.monotonic()), flush=True)
"""

# The floor: the bare etcd client watching the identities prefix in another process.
FLOOR = r"""
import asyncio, sys, time
from clustermesh.kvstore import KvStore
from clustermesh.models import IDENTITIES_PREFIX

async def main() -> None:
    expected, seen = int(sys.argv[2]), set()
    async with KvStore([sys.argv[1]]) as kv:
        _, rev = await kv.list_prefix(f"{IDENTITIES_PREFIX}/")
        print("ready", flush=True)
        async for events, _ in kv.watch(f"{IDENTITIES_PREFIX}/", rev + 1):
            now = time.monotonic()
            for ev in events:
                if ev.key not in seen:
                    seen.add(ev.key)
                    print(ev.key, repr(now), flush=True)
            if len(seen) >= expected:
                return

asyncio.run(main())
"""


class Poller:
    def __init__(self, pin: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", POLLER, str(pin / "policy"), "4"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise SystemExit("the map poller did not start")

    def ask(self, key: bytes, timeout: float) -> None:
        self.stdin.write(f"{key.hex()} {timeout}\n")
        self.stdin.flush()

    def count(self) -> int:
        self.stdin.write(f"count {POLICY_KEY.size}\n")
        self.stdin.flush()
        return int(self.stdout.readline())

    def answer(self) -> float | None:
        line = self.stdout.readline().strip()
        return None if line in ("none", "") else float(line)

    def close(self) -> None:
        self.stdin.close()
        stop_pid(self.proc)


def _unshare_net() -> None:
    """Everything from here on (etcd, agent, veths) lives in a private network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    sh("ip", "link", "set", "lo", "up")


async def _seed(east: str, west: str, args: argparse.Namespace) -> None:
    for endpoint, name, cid in ((east, "east", 1), (west, "west", 2)):
        await seed_cluster(endpoint, name, cid)
    async with KvStore([west]) as kv:
        await kv.put_many([(f"{IDENTITIES_PREFIX}/{WEST + 256 + i}", format_labels(labels_of(i)))
                           for i in range(args.identities)])
    async with KvStore([east]) as kv:
        await kv.put_many([(manifest_key("east", "PlexusNetworkPolicy", "default", b["metadata"]["name"]),
                            json.dumps(b)) for b in policy_bodies(args.rules)])


async def _writes(west: str, poller: Poller, ifindex: int, args: argparse.Namespace,
                  first: int) -> list[tuple[str, float, float, float | None]]:
    out = []
    async with KvStore([west]) as kv:
        await kv.status()
        for n in range(args.writes):
            ident = first + n
            key = f"{IDENTITIES_PREFIX}/{ident}"
            poller.ask(POLICY_KEY.pack(ifindex, ident, 8000, TCP, INGRESS), 10.0)
            t0 = time.monotonic()
            await kv.put(key, format_labels(labels_of(0)))  # app-0: rule 0 selects it
            acked = time.monotonic()
            out.append((key, t0, acked, poller.answer()))
            await asyncio.sleep(args.gap)
    return out


def latency(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    _unshare_net()
    pin = Path(f"/sys/fs/bpf/plexus-bench-{secrets.token_hex(3)}")
    work = Path(tempfile.mkdtemp(prefix="plexus-bench-"))
    (work / "mesh").mkdir()
    agent: subprocess.Popen[bytes] | None = None
    poller: Poller | None = None
    floor: subprocess.Popen[str] | None = None
    try:
        with etcd_server("east") as east, etcd_server("west") as west:
            t0 = time.monotonic()
            asyncio.run(_seed(east.endpoint, west.endpoint, args))
            seeded = time.monotonic() - t0
            (work / "mesh" / "west").write_text(f"endpoints: ['{west.endpoint}']\n")
            sh("ip", "link", "add", "plxlat0", "type", "veth", "peer", "name", "plxlat0p")
            sh("ip", "link", "set", "plxlat0", "up")
            sh("ip", "link", "set", "plxlat0p", "up")
            ifindex = socket.if_nametoindex("plxlat0")
            agent, api = start_agent(work, east.endpoint, extra=f"bpf: {{enabled: true, pinDir: {pin}}}\n",
                                     timeout=60)
            api.post("/v1/endpoints", {"container_id": "bench", "ip": "10.1.1.2", "namespace": "default",
                                       "pod_name": "server", "labels": {"role": "server"},
                                       "host_ifname": "plxlat0"})
            expected = sum(1 for i in range(args.identities) if i % APPS < args.rules) + 1  # + host

            def derived() -> bool:
                b = api.get("/v1/status")["modules"]["bpf"]
                if b.get("loaded") is False:
                    raise SystemExit(f"datapath not loaded: {b}")
                return bool(b.get("policyEntries") == expected)

            t0 = time.monotonic()
            wait_until(derived, 300, interval=0.2, what=f"{expected} policy entries derived")
            poller = Poller(pin)
            # steady state: every preloaded entry is in the map, not only in the agent's tables
            wait_until(lambda: poller.count() == expected, 300, interval=0.2,
                       what=f"{expected} entries in the map")
            synced = time.monotonic() - t0
            time.sleep(1.0)
            floor = subprocess.Popen([sys.executable, "-c", FLOOR, west.endpoint, str(args.writes)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
            first = WEST + 256 + args.identities + 1000
            results = asyncio.run(_writes(west.endpoint, poller, ifindex, args, first))
            floor.wait(30)
            seen_floor = {k: float(t) for k, t in (line.split() for line in floor.stdout)}
    finally:
        for proc in (floor, agent):
            if proc is not None:
                stop_pid(proc)
        if poller is not None:
            poller.close()
        shutil.rmtree(pin, ignore_errors=True)
        if (work / "agent.log").exists():
            shutil.copy(work / "agent.log", AGENT_LOG)
        shutil.rmtree(work, ignore_errors=True)
    agent_ms = [(seen - t0) * 1000 for _, t0, _, seen in results if seen is not None]
    floor_ms = [(seen_floor[k] - t0) * 1000 for k, t0, _, _ in results if k in seen_floor]
    ack_ms = [(acked - t0) * 1000 for _, t0, acked, _ in results]
    print(f"Remote identity written to etcd -> its entry in the pinned policy map, {args.writes} writes "
          f"{args.gap * 1000:.0f} ms apart; preloaded {args.identities} identities x {args.rules} rules "
          f"({expected} entries; etcd seeded in {seeded:.1f} s, agent synced to the map in {synced:.1f} s); "
          f"{machine()}")
    print(f"{'path':<48} {'writes':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, ms in (("etcd put acknowledged (writer)", ack_ms),
                     ("etcd client watch, no decoding (floor)", floor_ms),
                     ("Plexus agent: entry in the policy map", agent_ms)):
        print(f"{name:<48} {len(ms):>6} {percentile(ms, 50):>8.2f} {percentile(ms, 99):>8.2f} "
              f"{max(ms) if ms else float('nan'):>8.2f}")
    slow = [(n, None if seen is None else round((seen - t0) * 1000))
            for n, (_, t0, _, seen) in enumerate(results) if seen is None or seen - t0 > 0.1]
    if slow:
        print(f"over 100 ms (write number, ms; None: not within 10 s): {slow}; agent log: {AGENT_LOG}")
    print(f"rerun: .venv/bin/python -m bench.datapath.policy latency --identities {args.identities} "
          f"--rules {args.rules} --writes {args.writes} --gap {args.gap}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derive")
    d.add_argument("--identities", type=int, default=10_000)
    d.add_argument("--rules", type=int, default=100)
    d.add_argument("--endpoints", type=int, default=10)
    d.add_argument("--changes", type=int, default=200)
    d.add_argument("--full-runs", type=int, default=3)
    d.set_defaults(func=derive)
    lat = sub.add_parser("latency")
    lat.add_argument("--identities", type=int, default=10_000)
    lat.add_argument("--rules", type=int, default=100)
    lat.add_argument("--writes", type=int, default=200)
    lat.add_argument("--gap", type=float, default=0.02, help="seconds between writes")
    lat.set_defaults(func=latency)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

"""ClusterMesh benchmarks: propagation latency and initial sync of a large remote cluster.

    .venv/bin/python -m bench.clustermesh.bench propagation [--rate 1000] [--seconds 60]
    .venv/bin/python -m bench.clustermesh.bench sync [--endpoints 100000] ...

Each prints the Plexus figure next to the floor: the same etcd client watching the same
prefixes and decoding nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from bench.common import machine, percentile, rss_mb, seed_cluster, start_agent
from clustermesh.kvstore import KvStore
from clustermesh.models import (
    IDENTITIES_PREFIX,
    IPCACHE_PREFIX,
    NODES_PREFIX,
    SERVICES_PREFIX,
    ClusterService,
    IPIdentity,
    L4Addr,
    Node,
    NodeAddress,
)
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.tables import identities_table, ipcache_table, nodes_table, services_table
from plexus.core.manifests import manifests_table
from tests.support import etcd_server, stop_pid, wait_until

WEST_ID = 2


# ---- propagation ---------------------------------------------------------------------

def _writer(endpoint: str, rate: int, seconds: float, start_at: float) -> None:
    """A separate process writes ip entries at `rate`/s, stamping each with its send time."""
    async def run() -> None:
        async with KvStore([endpoint]) as kv:
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            n = int(rate * seconds)
            t0 = time.monotonic()
            inflight: set[asyncio.Task[int]] = set()
            for i in range(n):
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                ip = f"10.2.{(i >> 8) & 0xFF}.{i & 0xFF}"
                value = IPIdentity(ip=ip, identity=(WEST_ID << 16) + 300, host_ip="172.31.2.11",
                                   namespace="bench", pod_name=repr(time.time())).to_json()
                t = asyncio.create_task(kv.put(f"{IPCACHE_PREFIX}/{ip}", value))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
            await asyncio.gather(*inflight)
    asyncio.run(run())


async def _measure(endpoint: str, rate: int, seconds: float, floor: bool) -> list[float]:
    latencies: list[float] = []
    expected = int(rate * seconds)
    follower: asyncio.Task[None] | None = None
    kv = KvStore([endpoint])
    if floor:
        _, rev = await kv.list_prefix(f"{IPCACHE_PREFIX}/")

        async def follow() -> None:
            async for events, _ in kv.watch(f"{IPCACHE_PREFIX}/", rev + 1):
                now = time.time()
                for ev in events:
                    # the floor decodes only the timestamp it needs to measure
                    stamp = json.loads(ev.value)["K8sPodName"]
                    latencies.append(now - float(stamp))
        task = asyncio.create_task(follow())
    else:
        tables = MeshTables(nodes_table(), ipcache_table(), identities_table(), services_table(),
                            manifests_table())
        watcher = ClusterWatcher("west", kv, tables, local_cluster="east", local_id=1,
                                 ids_in_use=lambda _n: {})
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher.ready_event.wait(), 30)

        async def follow_table() -> None:
            async for keys in tables.ip_claims.watch(replay=False):
                now = time.time()
                for k in keys:
                    row = tables.ip_claims.get(k)
                    if row is not None and row.namespace == "bench":
                        latencies.append(now - float(row.pod_name))
        follower = asyncio.create_task(follow_table())
    start_at = time.time() + 1.0
    proc = multiprocessing.get_context("spawn").Process(
        target=_writer, args=(endpoint, rate, seconds, start_at))
    proc.start()
    deadline = time.monotonic() + seconds + 30
    while len(latencies) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    proc.join(10)
    task.cancel()
    if follower is not None:
        follower.cancel()
    await kv.close()
    return latencies


def propagation(args: argparse.Namespace) -> None:
    rows = []
    for floor in (True, False):
        with etcd_server("west") as west:
            asyncio.run(seed_cluster(west.endpoint, "west", WEST_ID))
            lat = asyncio.run(_measure(west.endpoint, args.rate, args.seconds, floor))
        ms = [x * 1000 for x in lat]
        rows.append(("etcd client watch, no decoding (floor)" if floor else "Plexus agent tables",
                     len(ms), percentile(ms, 50), percentile(ms, 99), max(ms) if ms else 0))
    print(f"ClusterMesh propagation, {args.rate} updates/s for {args.seconds:.0f} s "
          f"(remote etcd write -> agent table); {machine()}")
    print(f"{'path':<42} {'events':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, n, p50, p99, mx in rows:
        print(f"{name:<42} {n:>7} {p50:>8.2f} {p99:>8.2f} {mx:>8.2f}")
    print(f"rerun: .venv/bin/python -m bench.clustermesh.bench propagation --rate {args.rate} "
          f"--seconds {args.seconds:.0f}")


# ---- initial sync ----------------------------------------------------------------------

async def _fill(endpoint: str, endpoints: int, identities: int, nodes: int, services: int) -> None:
    base = WEST_ID << 16
    async with KvStore([endpoint]) as kv:
        items: list[tuple[str, str]] = []
        for i in range(identities):
            items.append((f"{IDENTITIES_PREFIX}/{base + 256 + i}",
                          f"k8s:app=a{i};k8s:io.cilium.k8s.policy.cluster=west;"))
        for i in range(nodes):
            addr = NodeAddress("InternalIP", f"172.31.{2 + i // 250}.{i % 250 + 1}")
            n = Node(f"n{i}", "west", WEST_ID, (addr,), f"10.{100 + i // 256}.{i % 256}.0/24")
            items.append((n.kv_key, n.to_json()))
        for i in range(services):
            s = ClusterService("west", "default", f"s{i}",
                               {f"10.96.{i // 250}.{i % 250 + 1}": {"http": L4Addr("TCP", 80)}},
                               {f"10.2.{i // 250}.{i % 250 + 1}": {"http": L4Addr("TCP", 8080)}},
                               cluster_id=WEST_ID)
            items.append((s.kv_key, s.to_json()))
        for i in range(endpoints):
            ip = f"10.{2 + (i >> 16)}.{(i >> 8) & 0xFF}.{i & 0xFF}"
            e = IPIdentity(ip=ip, identity=base + 256 + i % identities, host_ip="172.31.2.11",
                           namespace="default", pod_name=f"p{i}")
            items.append((e.kv_key, e.to_json()))
        await kv.put_many(items)


async def _floor_sync(endpoint: str) -> tuple[float, int]:
    t0 = time.monotonic()
    total = 0
    async with KvStore([endpoint]) as kv:
        for prefix in (f"{NODES_PREFIX}/west/", f"{IPCACHE_PREFIX}/", f"{IDENTITIES_PREFIX}/",
                       f"{SERVICES_PREFIX}/west/"):
            items, _ = await kv.list_prefix(prefix)
            total += len(items)
    return time.monotonic() - t0, total


def _agent_sync(west: str, east: str, expect: int) -> tuple[float, float, int]:
    work = Path(tempfile.mkdtemp(prefix="plexus-bench-"))
    (work / "mesh").mkdir()
    proc, api = start_agent(work, east, mesh_options=", configPollInterval: 0.05")
    try:
        wait_until(lambda: api.get("/v1/clustermesh/status")["clusters"]["east"]["ready"], 30)
        base_rss = rss_mb(proc.pid)
        t0 = time.monotonic()
        (work / "mesh" / "west").write_text(f"endpoints: ['{west}']\n")

        def synced() -> bool:
            c = api.get("/v1/clustermesh/status")["clusters"].get("west", {})
            seen = c.get("endpoints", 0) + c.get("identities", 0) + c.get("nodes", 0) + c.get("services", 0)
            return bool(c.get("ready")) and seen >= expect

        wait_until(synced, 120, interval=0.05)
        elapsed = time.monotonic() - t0
        return elapsed, rss_mb(proc.pid), int(base_rss)
    finally:
        stop_pid(proc)


def sync(args: argparse.Namespace) -> None:
    expect = args.endpoints + args.identities + args.nodes + args.services
    with etcd_server("west") as west, etcd_server("east") as east:
        asyncio.run(seed_cluster(west.endpoint, "west", WEST_ID))
        asyncio.run(seed_cluster(east.endpoint, "east", 1))
        t0 = time.monotonic()
        asyncio.run(_fill(west.endpoint, args.endpoints, args.identities, args.nodes, args.services))
        fill = time.monotonic() - t0
        floor_s, floor_n = asyncio.run(_floor_sync(west.endpoint))
        agent_s, rss, base = _agent_sync(west.endpoint, east.endpoint, expect)
    print(f"ClusterMesh initial sync of a remote with {args.endpoints} endpoints, {args.identities} "
          f"identities, {args.nodes} nodes, {args.services} services; {machine()}")
    print(f"  (filling the remote etcd took {fill:.1f} s)")
    print(f"  etcd client, list the same prefixes, no decoding (floor): {floor_s:.2f} s for {floor_n} keys")
    print(f"  Plexus agent, config file written -> remote ready with every entry: {agent_s:.2f} s, "
          f"agent RSS {rss:.0f} MB (idle before: {base} MB)")
    print(f"rerun: .venv/bin/python -m bench.clustermesh.bench sync --endpoints {args.endpoints} "
          f"--identities {args.identities} --nodes {args.nodes} --services {args.services}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("propagation")
    a.add_argument("--rate", type=int, default=1000)
    a.add_argument("--seconds", type=float, default=60)
    a.set_defaults(func=propagation)
    b = sub.add_parser("sync")
    b.add_argument("--endpoints", type=int, default=100_000)
    b.add_argument("--identities", type=int, default=10_000)
    b.add_argument("--nodes", type=int, default=1_000)
    b.add_argument("--services", type=int, default=500)
    b.set_defaults(func=sync)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

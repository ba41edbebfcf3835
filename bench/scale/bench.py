"""One agent, many remote clusters: sync, status, memory, CPU and propagation as N grows.

    .venv/bin/python -m bench.scale.bench --clusters 64 [--nodes 100 --endpoints 2000
        --identities 200 --services 20] [--rate 325] [--seconds 30]

Each remote cluster has its own etcd process (a remote's ipcache and identity prefixes are
not namespaced by cluster, so two clusters cannot share one etcd); the local cluster east
has one more. The generator fills every remote, then:

1. a real `plexus agent` of east is started and every remote's config file is written at
   once: time until all are ready with every entry, the status call during and after,
   agent RSS, sockets, and CPU while the remotes churn at `--rate` writes/s in all;
2. one remote's etcd is stopped and started again: time from its restart to ready;
3. propagation under the same churn (remote etcd write -> merged ipcache row): the agent's
   own watchers and ipcache merge in this process, next to the floor, a plain etcd client
   watching the same prefixes and decoding only the timestamp (with `--mode kvstoremesh`,
   also that client on the copy in east's etcd: the floor of the path through KVStoreMesh).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, percentile, rss_mb, seed_cluster, start_agent
from bench.scale.probe import Probe
from clustermesh.kvstore import KvStore
from clustermesh.models import (
    CACHE_PREFIX,
    IDENTITIES_PREFIX,
    IPCACHE_PREFIX,
    ClusterService,
    IPIdentity,
    L4Addr,
    Node,
    NodeAddress,
)
from clustermesh.ownership import IpcacheMerge
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.tables import identities_table, ipcache_table, nodes_table, services_table
from plexus.core.client import Client
from plexus.core.manifests import manifests_table
from plexus.core.memory import freeze_built_state
from plexus.lab.ops import hold_machine_lock
from tests.support import Etcd, etcd_server, free_port, stop_pid, wait_until

LOCAL_ID = 1


@dataclass(frozen=True)
class Shape:
    nodes: int
    endpoints: int
    identities: int
    services: int

    @property
    def entries(self) -> int:
        return self.nodes + self.endpoints + self.identities + self.services


@dataclass(frozen=True)
class Remote:
    name: str
    cluster_id: int
    etcd: Etcd


def _name(i: int) -> str:
    return f"r{i:03d}"


def _endpoint(cid: int, j: int, shape: Shape) -> tuple[str, int, str]:
    """Endpoint j of cluster cid: inside its node's pod CIDR, so the ipcache merge takes it."""
    node = j % shape.nodes
    ip = f"10.{cid}.{node}.{j // shape.nodes + 1}"
    return ip, (cid << 16) + 256 + j % shape.identities, f"172.30.{cid}.{node + 1}"


def _items(name: str, cid: int, shape: Shape) -> list[tuple[str, str]]:
    base = cid << 16
    items = [(f"{IDENTITIES_PREFIX}/{base + 256 + i}",
              f"k8s:app=a{i};k8s:io.cilium.k8s.policy.cluster={name};") for i in range(shape.identities)]
    for i in range(shape.nodes):
        n = Node(f"n{i}", name, cid, (NodeAddress("InternalIP", f"172.30.{cid}.{i + 1}"),),
                 f"10.{cid}.{i}.0/24")
        items.append((n.kv_key, n.to_json()))
    for i in range(shape.services):
        s = ClusterService(name, "default", f"s{i}", {f"10.96.{cid}.{i + 1}": {"http": L4Addr("TCP", 80)}},
                           {f"10.{cid}.0.1": {"http": L4Addr("TCP", 8080)}}, cluster_id=cid, shared=True)
        items.append((s.kv_key, s.to_json()))
    for j in range(shape.endpoints):
        ip, ident, host = _endpoint(cid, j, shape)
        items.append((IPIdentity(ip, ident, host_ip=host, namespace="default", pod_name=f"p{j}").kv_key,
                      IPIdentity(ip, ident, host_ip=host, namespace="default", pod_name=f"p{j}").to_json()))
    return items


@contextmanager
def _etcds(names: list[str]) -> Iterator[list[Etcd]]:
    """One etcd per name, started a few at a time, all stopped and removed afterwards."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="plexus-scale-")))
        ports = _distinct_ports(2 * len(names))
        etcds = [Etcd(n, f"http://127.0.0.1:{ports[2 * i]}", f"http://127.0.0.1:{ports[2 * i + 1]}",
                      tmp / n / "data") for i, n in enumerate(names)]
        for e in etcds:
            e.data_dir.parent.mkdir(parents=True)
            stack.callback(e.stop)

        def start(e: Etcd) -> None:
            try:
                e.start(["--quota-backend-bytes", str(256 << 20)])
            except AssertionError:  # a port taken meanwhile by another program: new ones
                e.stop()
                shutil.rmtree(e.data_dir, ignore_errors=True)
                e.client_url, e.peer_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
                e.start(["--quota-backend-bytes", str(256 << 20)])
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(start, etcds))
        yield etcds


def _distinct_ports(n: int) -> list[int]:
    """`n` free loopback ports, all different: each socket stays bound until all are chosen."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]


async def _fill(remotes: list[Remote], shape: Shape) -> None:
    async def one(r: Remote) -> None:
        await seed_cluster(r.etcd.endpoint, r.name, r.cluster_id)
        async with KvStore([r.etcd.endpoint]) as kv:
            await kv.put_many(_items(r.name, r.cluster_id, shape))
    sem = asyncio.Semaphore(16)

    async def limited(r: Remote) -> None:
        async with sem:
            await one(r)
    await asyncio.gather(*(limited(r) for r in remotes))


# ---- churn: a separate process writes endpoint updates stamped with their send time ----

def _churn(targets: list[tuple[str, int]], shape: Shape, rate: int, seconds: float, start_at: float) -> None:
    async def run() -> None:
        kvs = [KvStore([ep]) for ep, _ in targets]
        try:
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            t0 = time.monotonic()
            inflight: set[asyncio.Task[int]] = set()
            for i in range(int(rate * seconds)):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                k = i % len(targets)
                cid = targets[k][1]
                ip, ident, host = _endpoint(cid, (i // len(targets)) % shape.endpoints, shape)
                value = IPIdentity(ip, ident, host_ip=host, namespace="bench", pod_name=repr(time.time()))
                t = asyncio.create_task(kvs[k].put(value.kv_key, value.to_json()))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
            await asyncio.gather(*inflight)
        finally:
            for kv in kvs:
                await kv.close()
    asyncio.run(run())


def _start_churn(remotes: list[Remote], shape: Shape, rate: int, seconds: float,
                 delay: float = 1.0) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("spawn").Process(
        target=_churn, args=([(r.etcd.endpoint, r.cluster_id) for r in remotes], shape, rate, seconds,
                             time.time() + delay))
    proc.start()
    return proc


# ---- the real agent ----------------------------------------------------------------------

def _timed_status(api: Client) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    s = api.get("/v1/clustermesh/status")
    return (time.perf_counter() - t0) * 1000, s


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


@contextmanager
def _kvstoremesh(remotes: list[Remote], east: str, work: Path,
                 program: tuple[str, ...] = ()) -> Iterator[tuple[Client, int]]:
    """A `plexus kvstoremesh` for east, every remote in its config dir, stopped afterwards:
    its API client and its pid."""
    d = work / "kvstoremesh"
    d.mkdir()
    for r in remotes:
        (d / r.name).write_text(f"endpoints: ['{r.etcd.endpoint}']\n")
    sock = work / "kvstoremesh.sock"
    with open(work / "kvstoremesh.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, *(program or ("-m", "plexus")), "kvstoremesh",
                                 "--cluster-name", "east",
                                 "--cluster-id", str(LOCAL_ID), "--etcd", east, "--config-dir", str(d),
                                 "--api-socket", str(sock), "--metrics-port", "0"], cwd=ROOT, stderr=log)
    try:
        wait_until(sock.exists, 30, what="kvstoremesh socket")
        yield Client(sock, timeout=30), proc.pid
    finally:
        stop_pid(proc)


def _probe_args(args: argparse.Namespace, program: str) -> tuple[str, ...]:
    """The interpreter's arguments that run `plexus` under bench.scale.probe, or none."""
    if not args.probe:
        return ()
    out = Path(args.probe) / program
    out.mkdir(parents=True, exist_ok=True)
    return ("-m", "bench.scale.probe", str(out), *(["--profile"] if args.profile else []), "--")


def _probe_report(pid: int, out: Path) -> dict[str, Any]:
    """Close the probe's window and read what it saw."""
    (out / "probe.json").unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    wait_until(lambda: (out / "probe.json").exists(), 60, what="the probe's report")
    report: dict[str, Any] = json.loads((out / "probe.json").read_text())
    if (out / "profile.pstats").exists():
        with open(out / "profile.txt", "w") as f:
            st = pstats.Stats(str(out / "profile.pstats"), stream=f)
            st.sort_stats("tottime").print_stats(40)
            st.sort_stats("cumulative").print_stats(60)
    return report


def _agent_phase(remotes: list[Remote], east: str, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cached = args.mode == "kvstoremesh"
    with tempfile.TemporaryDirectory(prefix="plexus-scale-agent-") as d, ExitStack() as stack:
        work = Path(d)
        (work / "mesh").mkdir()
        probe = _probe_args(args, "agent")
        proc, api = start_agent(work, east, mesh_options=", mode: kvstoremesh" if cached else "",
                                program=probe or ("-m", "plexus"))
        stack.callback(stop_pid, proc)
        try:
            wait_until(lambda: api.get("/v1/clustermesh/status")["clusters"]["east"]["ready"], 30)
            out["rss_idle"] = rss_mb(proc.pid)
            during: list[float] = []

            def synced() -> bool:
                ms, s = _timed_status(api)
                during.append(ms)
                cs = [s["clusters"].get(r.name, {}) for r in remotes]
                return all(c.get("ready") and c.get("nodes", 0) + c.get("endpoints", 0)
                           + c.get("identities", 0) + c.get("services", 0) >= shape.entries for c in cs)

            t0 = time.monotonic()
            if cached:
                km, _ = stack.enter_context(_kvstoremesh(remotes, east, work))
            for r in remotes:
                (work / "mesh" / r.name).write_text(f"endpoints: ['{r.etcd.endpoint}']\n")
            wait_until(synced, 600, interval=0.1, what="every remote ready with every entry")
            out["sync"] = time.monotonic() - t0
            out["status_during_sync"] = max(during)
            calls = [_timed_status(api)[0] for _ in range(30)]
            out["status"] = statistics.median(calls)
            out["status_max"] = max(calls)
            out["rss"] = rss_mb(proc.pid)
            out["sockets"] = _sockets(proc.pid)
            churn = _start_churn(remotes, shape, args.rate, args.seconds, delay=0.5)
            if probe:
                time.sleep(0.5)
                os.kill(proc.pid, signal.SIGUSR1)
            cpu0, w0 = _cpu_seconds(proc.pid), time.monotonic()
            churn_calls = []
            while churn.is_alive():
                churn_calls.append(_timed_status(api)[0])
                churn.join(1.0)
            out["cpu"] = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - w0) * 100
            if probe:
                out["probe"] = _probe_report(proc.pid, Path(args.probe) / "agent")
            out["status_churn"] = statistics.median(churn_calls) if churn_calls else float("nan")
            out["rss_churn"] = rss_mb(proc.pid)
            # Recovery: the first remote's etcd restarts.
            victim = remotes[0]
            victim.etcd.stop()

            def follower() -> dict[str, Any]:  # who follows the remote: the agent or KVStoreMesh
                if cached:
                    return dict(km.get("/v1/status")["modules"]["kvstoremesh"]["clusters"][victim.name])
                return dict(api.get("/v1/clustermesh/status")["clusters"][victim.name])
            wait_until(lambda: not follower()["connected"], 60, interval=0.1, what="the remote seen gone")
            kept = api.get("/v1/clustermesh/status")["clusters"][victim.name]
            out["kept_while_down"] = kept["nodes"] + kept["endpoints"] + kept["identities"] + kept["services"]
            out["agent_ready_while_down"] = kept["ready"]
            t0 = time.monotonic()
            victim.etcd.start()
            wait_until(lambda: follower()["ready"], 120, interval=0.05,
                       what="the restarted remote ready again")
            out["recovery"] = time.monotonic() - t0
            if cached:
                out["kvstoremesh_rss"] = rss_mb(int(km.get("/v1/status")["pid"]))
        finally:
            stop_pid(proc)
    return out


# ---- propagation: the agent's watchers and merge in this process, next to the floor ------

async def _propagation(remotes: list[Remote], shape: Shape, args: argparse.Namespace,
                       floor: bool, east: str, via_copy: bool = False, what: str = "",
                       probes: dict[str, dict[str, Any]] | None = None,
                       km_pid: int | None = None) -> list[float]:
    """Remote write -> merged ipcache row; or, as `floor`, -> a bare client's watch event of
    the remote's etcd, or (`via_copy`) of KVStoreMesh's copy in east's etcd. With --probe,
    what this process's event loop and kvstoremesh's (`km_pid`) went through goes in `probes`."""
    latencies: list[float] = []
    probe = None
    if args.probe and probes is not None:
        probe = Probe(Path(args.probe) / f"bench-{what}", profile=False)
        probe.out.mkdir(parents=True, exist_ok=True)
        gc.callbacks.append(probe.on_gc)
    cached = args.mode == "kvstoremesh" and not floor
    kvs = ([KvStore([east])] * (1 if floor else len(remotes)) if cached or via_copy
           else [KvStore([r.etcd.endpoint]) for r in remotes])
    watched = f"{CACHE_PREFIX}/ip/v1/" if via_copy else f"{IPCACHE_PREFIX}/"
    tasks: list[asyncio.Task[Any]] = []
    try:
        if floor:
            for kv in kvs:
                _, rev = await kv.list_prefix(watched)

                async def follow(kv: KvStore = kv, rev: int = rev) -> None:
                    async for events, _ in kv.watch(watched, rev + 1):
                        now = time.time()
                        for ev in events:
                            body = json.loads(ev.value)
                            if body.get("K8sNamespace") == "bench":
                                latencies.append(now - float(body["K8sPodName"]))
                tasks.append(asyncio.create_task(follow()))
        else:
            tables = MeshTables(nodes_table(), ipcache_table(), identities_table(), services_table(),
                                manifests_table())
            watchers = {r.name: ClusterWatcher(r.name, kv, tables, local_cluster="east", local_id=LOCAL_ID,
                                               ids_in_use=lambda _n: {}, cached=cached)
                        for r, kv in zip(remotes, kvs, strict=True)}
            # as the agent: a claim that comes before its node record is not a warning
            merge = IpcacheMerge("east", tables.ip_claims, tables.nodes, tables.ipcache,
                                 settled=lambda c: c in watchers and watchers[c].status.ready)
            tasks += [asyncio.create_task(w.run()) for w in watchers.values()]

            async def claims() -> None:
                async for keys in tables.ip_claims.watch():
                    merge.claims_changed(keys)

            async def owners() -> None:
                async for keys in tables.nodes.watch():
                    merge.nodes_changed(keys)
            tasks += [asyncio.create_task(claims()), asyncio.create_task(owners())]
            await asyncio.wait_for(asyncio.gather(*(w.ready_event.wait() for w in watchers.values())), 300)
            merge.rebuild()
            freeze_built_state()  # as the agent does once every remote is ready

            async def follow_merged() -> None:
                async for keys in tables.ipcache.watch(replay=False):
                    now = time.time()
                    for k in keys:
                        row = tables.ipcache.get(k)
                        if row is not None and row.namespace == "bench":
                            latencies.append(now - float(row.pod_name))
            tasks.append(asyncio.create_task(follow_merged()))
        await asyncio.sleep(0)
        churn = _start_churn(remotes, shape, args.rate, args.seconds)
        if probe is not None:
            tasks.append(asyncio.create_task(probe.ticks()))
            await asyncio.sleep(1.0)  # the churn's start
            probe.start()
            if km_pid is not None:
                os.kill(km_pid, signal.SIGUSR1)
        expected = int(args.rate * args.seconds)
        deadline = time.monotonic() + args.seconds + 60
        while churn.is_alive() or (len(latencies) < expected and time.monotonic() < deadline):
            await asyncio.sleep(0.2)
            if not churn.is_alive() and time.monotonic() > deadline:
                break
        churn.join(10)
        if probe is not None and probes is not None:
            probe.stop()
            probes[f"bench ({what} pass)"] = json.loads((probe.out / "probe.json").read_text())
            if km_pid is not None:
                probes["kvstoremesh"] = _probe_report(km_pid, Path(args.probe) / "kvstoremesh")
    finally:
        if probe is not None:
            gc.callbacks.remove(probe.on_gc)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for kv in set(kvs):
            await kv.close()
        gc.unfreeze()  # the next pass starts from the same collector
    return latencies


def _describe_probe(r: dict[str, Any]) -> str:
    lag, gcs = r["loop_lag_ms"], r["gc_ms"]
    return (f"event loop late p50 {lag['p50']:.1f} / p99 {lag['p99']:.1f} / max {lag['max']:.1f} ms, "
            f"{lag['over_20ms']} stalls > 20 ms ({lag['total_over_20ms']:.0f} ms) in {r['seconds']:.0f} s; "
            + ", ".join(f"gc gen{g} n={v['n']} total {v['total']:.0f} ms max {v['max']:.1f} ms"
                        for g, v in gcs.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=2000)
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--rate", type=int, default=325, help="writes/s over all remotes")
    p.add_argument("--seconds", type=float, default=30, help="of churn per measurement")
    p.add_argument("--mode", choices=["direct", "kvstoremesh"], default="direct",
                   help="direct: the agent connects to every remote; kvstoremesh: a `plexus "
                        "kvstoremesh` copies them into east's etcd, the agent reads only that")
    p.add_argument("--skip-propagation", action="store_true")
    p.add_argument("--probe", metavar="DIR", help="run the agent (and kvstoremesh) under bench.scale.probe "
                   "and print its event-loop stalls and garbage collections under churn; reports in DIR")
    p.add_argument("--profile", action="store_true",
                   help="with --probe: also cProfile them (DIR/*/profile.txt)")
    args = p.parse_args()
    if not 1 <= args.clusters <= 250:
        p.error("--clusters: 1 to 250 (cluster ids 2..251 next to the local cluster's 1)")
    shape = Shape(args.nodes, args.endpoints, args.identities, args.services)
    hold_machine_lock()
    names = [_name(i) for i in range(args.clusters)]
    t0 = time.monotonic()
    with etcd_server("east") as east, _etcds(names) as etcds:
        started = time.monotonic() - t0
        asyncio.run(seed_cluster(east.endpoint, "east", LOCAL_ID))
        remotes = [Remote(n, i + 2, e) for i, (n, e) in enumerate(zip(names, etcds, strict=True))]
        t0 = time.monotonic()
        asyncio.run(_fill(remotes, shape))
        filled = time.monotonic() - t0
        agent = _agent_phase(remotes, east.endpoint, shape, args)
        prop: dict[str, list[float]] = {}
        probes: dict[str, dict[str, Any]] = {}
        if not args.skip_propagation:
            with ExitStack() as stack:
                pid = 0
                if args.mode == "kvstoremesh":  # the copy in east's etcd, kept current meanwhile
                    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="plexus-scale-km-")))
                    km, pid = stack.enter_context(_kvstoremesh(remotes, east.endpoint, work,
                                                                  _probe_args(args, "kvstoremesh")))
                    wait_until(lambda: km.get("/v1/healthz")["ready"], 300, what="kvstoremesh ready")
                passes = [("floor", True, False), ("plexus", False, False)]
                if args.mode == "kvstoremesh":  # the copy's own floor: remote -> kvstoremesh -> east
                    passes.insert(1, ("copy", True, True))
                for what, floor, via_copy in passes:
                    prop[what] = [x * 1000 for x in asyncio.run(
                        _propagation(remotes, shape, args, floor, east.endpoint, via_copy, what, probes,
                                     pid if what == "plexus" and args.mode == "kvstoremesh" else None))]
    total = args.clusters * shape.entries
    print(f"ClusterMesh scale: {args.clusters} remote clusters x {shape.entries} entries "
          f"({shape.nodes} nodes, "
          f"{shape.endpoints} endpoints, {shape.identities} identities, {shape.services} services) = "
          f"{total} entries; one etcd per remote; mode {args.mode}; "
          f"churn {args.rate} writes/s for {args.seconds:.0f} s; "
          f"{machine()}")
    print(f"  ({args.clusters + 1} etcds started in {started:.1f} s, filled in {filled:.1f} s)")
    print(f"  sync to ready (all config files written -> every remote ready with every entry): "
          f"{agent['sync']:.2f} s; slowest status call meanwhile {agent['status_during_sync']:.1f} ms")
    print(f"  status call: median {agent['status']:.1f} ms, max {agent['status_max']:.1f} ms idle; "
          f"median {agent['status_churn']:.1f} ms under churn")
    print(f"  agent RSS {agent['rss']:.0f} MB synced (idle before {agent['rss_idle']:.0f} MB, "
          f"{agent['rss_churn']:.0f} MB after churn); CPU under churn {agent['cpu']:.0f} % of one core; "
          f"sockets {agent['sockets']}")
    print(f"  remote restart: {agent['kept_while_down']} entries kept while down (agent says ready: "
          f"{agent['agent_ready_while_down']}), ready {agent['recovery']:.2f} s after its etcd started again")
    if "probe" in agent:
        print(f"  agent under churn (probe): {_describe_probe(agent['probe'])}")
    for who, report in probes.items():
        print(f"  {who} under churn (probe): {_describe_probe(report)}")
    if "kvstoremesh_rss" in agent:
        print(f"  kvstoremesh RSS {agent['kvstoremesh_rss']:.0f} MB")
    for what, ms in prop.items():
        label = ("etcd client watch, timestamp only (floor)" if what == "floor"
                 else "the same on kvstoremesh's copy in east's etcd" if what == "copy"
                 else "Plexus watchers + ipcache merge"
                 + (" via kvstoremesh" if args.mode == "kvstoremesh" else ""))
        print(f"  propagation {label:<42} n={len(ms):>6} p50 {percentile(ms, 50):7.1f} ms  "
              f"p99 {percentile(ms, 99):7.1f} ms  max {max(ms) if ms else float('nan'):7.1f} ms")
    print(f"rerun: .venv/bin/python -m bench.scale.bench --clusters {args.clusters} --nodes {shape.nodes} "
          f"--endpoints {shape.endpoints} --identities {shape.identities} --services {shape.services} "
          f"--rate {args.rate} --seconds {args.seconds:.0f} --mode {args.mode}")


if __name__ == "__main__":
    main()

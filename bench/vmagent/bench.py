"""VM enrolment benchmarks, against a real etcd (TLS, one etcd user per VM, auth on), the
cluster's apiserver, and a remote cluster's view of it (the watcher every node of another
cluster runs, reading the VMs' node records and ipcache entries):

    .venv/bin/python -m bench.vmagent.bench join [--runs 5]
    .venv/bin/python -m bench.vmagent.bench many [--hosts 100] [--lease 10]

`join`: a `plexus vm join` process (no WireGuard or datapath: what is timed is enrolment)
from its start until the other cluster's view holds the host's ipcache entry with its
identity; the agent's RSS once joined. `many`: that many hosts, each with its own
certificate and etcd user, join at once (registrations in one process: the cost measured is
etcd's, the apiserver's and the watchers', not Python's start-up); then all are killed at
once and each one's withdrawal from the other cluster's view is timed against its lease.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine, percentile, rss_mb
from clustermesh.apiserver import ApiServer
from clustermesh.kvstore import KvStore, Tls
from clustermesh.pki import etcd_auth_commands, etcd_tls_args, etcdctl_tls, make_cluster_pki
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.tables import identities_table, ipcache_table, nodes_table, services_table
from plexus.core.manifests import manifests_table
from tests.support import Etcd, free_port, stop_pid
from vmagent import enrol
from vmagent.bundle import cert_serial, write_bundle
from vmagent.registration import Registration

WG_KEY = "b" * 43 + "="


@dataclass
class _TlsEtcd(Etcd):
    args: list[str] = field(default_factory=list)

    def healthy(self) -> bool:
        return subprocess.run(["etcdctl", "--endpoints", self.client_url, *self.args, "endpoint",
                               "health"], capture_output=True).returncode == 0


@contextmanager
def cluster_etcd() -> Iterator[tuple[str, Path]]:
    work = Path(tempfile.mkdtemp(prefix="plexus-bench-vm-"))
    pki = work / "pki" / "east"
    make_cluster_pki("east", pki, ["127.0.0.1"])
    e = _TlsEtcd("east", f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                 work / "data", args=etcdctl_tls(pki))
    try:
        e.start([*etcd_tls_args(pki), "--quota-backend-bytes", str(2 << 30)])
        for cmd in etcd_auth_commands("east"):
            subprocess.run(["etcdctl", "--endpoints", e.client_url, *e.args, *cmd], check=True,
                           capture_output=True)
        yield e.client_url, pki
    finally:
        e.stop()
        shutil.rmtree(work, ignore_errors=True)


class View:
    """What a node of another cluster (west) learns of east: the same watcher code."""

    def __init__(self, kv: KvStore) -> None:
        self.tables = MeshTables(nodes_table(), ipcache_table(), identities_table(),
                                 services_table(), manifests_table())
        self.watcher = ClusterWatcher("east", kv, self.tables, local_cluster="west", local_id=2,
                                      ids_in_use=lambda _n: {})
        self.seen: dict[str, float] = {}  # ip -> when its entry arrived
        self.gone: dict[str, float] = {}  # ip -> when it was removed

    async def run(self) -> None:
        task = asyncio.create_task(self.watcher.run())
        follow = asyncio.create_task(self._follow())
        try:
            await asyncio.gather(task, follow)
        finally:
            task.cancel()
            follow.cancel()

    async def _follow(self) -> None:
        async for keys in self.tables.ip_claims.watch():
            now = time.monotonic()
            for key in keys:
                ip = key[1].split("/")[0]
                if self.tables.ip_claims.get(key) is not None:
                    self.seen.setdefault(ip, now)
                    self.gone.pop(ip, None)
                else:
                    self.gone.setdefault(ip, now)

    def peers(self) -> int:
        return sum(1 for n in self.tables.nodes.all() if n.wireguard_pubkey)


async def _setup(endpoint: str, pki: Path) -> tuple[KvStore, ApiServer, asyncio.Task[None], View,
                                                     asyncio.Task[None]]:
    kv = KvStore([endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"), timeout=30)
    server = ApiServer(kv, "east", 1, gc_interval=3600)
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.synced.wait(), 30)
    view_kv = KvStore([endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    view = View(view_kv)
    vtask = asyncio.create_task(view.run())
    await asyncio.wait_for(view.watcher.ready_event.wait(), 30)
    return kv, server, task, view, vtask


def _spawn_join(bundle: Path, work: Path, i: int) -> subprocess.Popen[bytes]:
    with open(work / f"bench{i}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "plexus", "vm", "join", str(bundle),
                                 "--state-dir", str(work / f"s{i}"), "--no-encryption", "--no-bpf"],
                                cwd=ROOT, stdout=log, stderr=log)


async def bench_join(runs: int) -> None:
    with cluster_etcd() as (endpoint, pki):
        kv, _server, task, view, vtask = await _setup(endpoint, pki)
        admin = enrol.ClusterAdmin("east", kv, pki, [endpoint])
        times, rss = [], []
        work = Path(tempfile.mkdtemp(prefix="plexus-bench-vmjoin-"))
        try:
            for i in range(runs):
                ip = f"127.0.1.{10 + i}"
                bundle = await enrol.create(admin, f"bench{i}", ip, {"app": "db"}, lease=10)
                path = work / f"bench{i}.yaml"
                write_bundle(path, bundle)
                t0 = time.monotonic()
                proc = _spawn_join(path, work, i)
                try:
                    while ip not in view.seen:
                        if proc.poll() is not None:
                            raise RuntimeError((work / f"bench{i}.log").read_text()[-2000:])
                        await asyncio.sleep(0.005)
                    times.append(view.seen[ip] - t0)
                    rss.append(rss_mb(proc.pid))
                finally:
                    stop_pid(proc)
                await enrol.delete(admin, f"bench{i}")
        finally:
            vtask.cancel()
            task.cancel()
            await asyncio.gather(vtask, task, return_exceptions=True)
            await kv.close()
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"join, `plexus vm join` start -> ipcache entry in the other cluster's view, {runs} runs: "
          f"median {percentile(times, 50):.2f} s, max {max(times):.2f} s "
          f"(of which Python start-up and imports are most); vmagent RSS once joined "
          f"{percentile(rss, 50):.0f} MB")
    print(f"rerun: .venv/bin/python -m bench.vmagent.bench join --runs {runs}")


async def bench_many(hosts: int, lease: int) -> None:
    with cluster_etcd() as (endpoint, pki):
        kv, _server, task, view, vtask = await _setup(endpoint, pki)
        admin = enrol.ClusterAdmin("east", kv, pki, [endpoint])
        work = Path(tempfile.mkdtemp(prefix="plexus-bench-vmmany-"))
        regs: list[tuple[str, Registration, KvStore]] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            t_enrol = time.monotonic()
            for i in range(hosts):
                ip = f"127.2.{i // 250}.{1 + i % 250}"
                b = await enrol.create(admin, f"h{i}", ip, {"app": "fleet", "n": str(i)},
                                       lease=lease, ttl=datetime.timedelta(hours=1))
                d = work / f"h{i}"
                d.mkdir()
                for name in ("ca", "cert", "key"):
                    (d / name).write_text(getattr(b.etcd, name))
                    os.chmod(d / name, 0o600)
                vkv = KvStore([endpoint], Tls(d / "ca", d / "cert", d / "key"), timeout=30)
                regs.append((ip, Registration(vkv, "east", f"h{i}", lease, cert_serial(b),
                                              lambda: WG_KEY), vkv))
            enrol_s = time.monotonic() - t_enrol
            t0 = time.monotonic()
            tasks = [asyncio.create_task(r.run()) for _, r, _ in regs]
            want = {ip for ip, _, _ in regs}
            while not (want <= view.seen.keys() and view.peers() >= hosts):
                await asyncio.sleep(0.01)
            all_in = time.monotonic() - t0
            joins = sorted(view.seen[ip] - t0 for ip in want)
            errors = sum(1 for _, r, _ in regs if r.status.state != "joined")
            # all killed at once: nothing revoked, the leases run out
            killed = time.monotonic()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            deadline = killed + lease + 30
            while not want <= view.gone.keys() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            withdrawn = [view.gone[ip] - killed for ip in want if ip in view.gone]
        finally:
            for t in tasks:
                t.cancel()
            for _, _, vkv in regs:
                await vkv.close()
            vtask.cancel()
            task.cancel()
            await asyncio.gather(vtask, task, return_exceptions=True)
            await kv.close()
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"{hosts} hosts enrolled (user, role, certificate, spec each) in {enrol_s:.1f} s")
    print(f"{hosts} hosts joining at once -> every ipcache entry and WireGuard key in the other "
          f"cluster's view: {all_in:.2f} s (first {joins[0]:.2f} s, p50 {percentile(joins, 50):.2f} s); "
          f"hosts not joined: {errors}")
    print(f"all killed at once, lease {lease} s: withdrawn {len(withdrawn)}/{hosts}, "
          f"p50 {percentile(withdrawn, 50):.2f} s, p99 {percentile(withdrawn, 99):.2f} s, "
          f"max {max(withdrawn, default=float('nan')):.2f} s (target: p99 within lease + 2 s)")
    print(f"rerun: .venv/bin/python -m bench.vmagent.bench many --hosts {hosts} --lease {lease}")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.vmagent.bench")
    sub = p.add_subparsers(dest="what", required=True)
    j = sub.add_parser("join")
    j.add_argument("--runs", type=int, default=5)
    m = sub.add_parser("many")
    m.add_argument("--hosts", type=int, default=100)
    m.add_argument("--lease", type=int, default=10)
    args = p.parse_args()
    if args.what == "join":
        asyncio.run(bench_join(args.runs))
    else:
        asyncio.run(bench_many(args.hosts, args.lease))


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: percentiles, the machine line, seeded etcds and a started
agent."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from clustermesh.kvstore import KvStore
from clustermesh.models import SYNCED_PREFIXES, ClusterConfig, synced_key
from plexus.core.client import Client
from tests.support import stop_pid, wait_until

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def machine() -> str:
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"{os.cpu_count()} vCPU, kernel {platform.release()}, Python {platform.python_version()}, "
            f"{etcd.strip()}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def seed_cluster(endpoint: str, name: str, cluster_id: int) -> None:
    """What a cluster's etcd holds before agents of other clusters connect: its config and
    the marks that its prefixes are synced."""
    async with KvStore([endpoint]) as kv:
        await kv.put(f"cilium/cluster-config/{name}", ClusterConfig(id=cluster_id).to_json())
        for prefix in SYNCED_PREFIXES:
            await kv.put(synced_key(name, prefix), "now")


def start_agent(work: Path, etcd: str, mesh_options: str = "", extra: str = "",
                timeout: float = 30, program: tuple[str, ...] = ("-m", "plexus")
                ) -> tuple[subprocess.Popen[bytes], Client]:
    """A `plexus agent` for node n1 of cluster east (id 1) on its own `etcd`, remote clusters
    read from `work`/mesh, config in `work`/agent.yaml, log in `work`/agent.log. Returned
    with its API client once the socket is up; stopped again if it does not come up.

    `mesh_options` follows the clustermesh options (", key: value"); `extra` is more config
    (whole lines); `program` is what the interpreter runs (`bench.scale.probe` wraps it)."""
    cfg = work / "agent.yaml"
    cfg.write_text("cluster: {name: east, id: 1}\n"
                   "node: {name: n1, ip: 172.31.1.11, podCIDR: 10.1.1.0/24}\n"
                   f"stateDir: {work / 'state'}\napiSocket: {work / 'agent.sock'}\nmetrics: {{port: null}}\n"
                   f"clustermesh: {{etcd: {{endpoints: ['{etcd}']}}, configDir: {work / 'mesh'}, "
                   f"directRoutes: false{mesh_options}}}\n"
                   f"{extra}")
    with open(work / "agent.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, *program, "agent", "--config", str(cfg)],
                                cwd=ROOT, stderr=log)
    try:
        wait_until(lambda: (work / "agent.sock").exists(), timeout, what="agent socket")
    except BaseException:
        stop_pid(proc)
        raise
    return proc, Client(work / "agent.sock", timeout=30)

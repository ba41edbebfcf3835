"""`plexus vm create | list | join | delete` and `plexus vmagent` as processes, against a real
etcd with TLS and RBAC and the cluster's apiserver: the host joins, is withdrawn when killed,
returns on restart, keeps its record on stop, and is gone once revoked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from clustermesh.apiserver import ApiServer
from clustermesh.kvstore import KvStore, Tls
from clustermesh.models import IPCACHE_PREFIX, NODES_PREFIX
from plexus.core.client import Client
from tests.integration.test_vmagent import cluster_etcd  # noqa: F401  (fixture)
from tests.support import ROOT, Etcd, eventually, stop_pid

VM_IP = "127.0.0.5"  # local to this namespace, as the VM's address must be


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def vmagent(workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(workdir / "vmagent.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "plexus", *args], cwd=ROOT, stderr=log,
                                stdout=log)
    finally:
        log.close()


async def listed(admin: list[str]) -> list[dict[str, Any]]:
    r = await asyncio.to_thread(plexus, "vm", "list", "-o", "json", *admin)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


async def state_of(admin: list[str], name: str) -> str:
    rows = {r["name"]: r for r in await listed(admin)}
    return rows[name]["state"] if name in rows else "absent"


async def test_vm_commands_and_vmagent_process(cluster_etcd: tuple[Etcd, Path],  # noqa: F811
                                               tmp_path: Path) -> None:
    etcd, pki = cluster_etcd
    kv = KvStore([etcd.endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    server = ApiServer(kv, "east", 1, gc_interval=3600)
    task = asyncio.create_task(server.run())
    admin = ["--cluster", "east", "--etcd", etcd.endpoint, "--pki", str(pki)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await eventually(server.synced.is_set, 15, what="apiserver synced")
        bundle = tmp_path / "db5.yaml"
        r = await asyncio.to_thread(plexus, "vm", "create", "db5", *admin, "--ip", VM_IP,
                                    "--labels", "app=db,env=prod", "--lease", "4", "-o", str(bundle))
        assert r.returncode == 0, r.stderr
        assert os.stat(bundle).st_mode & 0o777 == 0o600
        [row] = await listed(admin)
        assert (row["name"], row["state"], row["labels"]) == ("db5", "pending",
                                                              {"app": "db", "env": "prod"})

        # Refused before anything runs: a bad label, another name, an address not this host's.
        r = await asyncio.to_thread(plexus, "vm", "create", "x1", *admin, "--ip", VM_IP,
                                    "--labels", "app")
        assert r.returncode == 2 and "'app' is not key=value" in r.stderr
        r = await asyncio.to_thread(plexus, "vm", "join", str(bundle), "--name", "web9",
                                    "--state-dir", str(tmp_path / "x"))
        assert r.returncode == 2 and "this bundle is for VM 'db5', not 'web9'" in r.stderr
        assert not (tmp_path / "x").exists()

        state = tmp_path / "vm"
        sock = tmp_path / "vm.sock"
        join = ["vm", "join", str(bundle), "--state-dir", str(state), "--api-socket", str(sock),
                "--no-encryption", "--no-bpf"]
        procs.append(vmagent(tmp_path, *join))
        await eventually(lambda: state_of(admin, "db5"), 20, what="listed")
        await eventually(lambda: _joined(admin), 30, what="the host joined")
        ip = await kv.get(f"{IPCACHE_PREFIX}/{VM_IP}")
        assert ip is not None and await kv.get(f"{NODES_PREFIX}/east/db5") is not None

        # `plexus status` against the vmagent: every module, the VM's registration joined,
        # clustermesh reading the cluster with the VM's own certificate.
        status = await asyncio.to_thread(Client(sock).get, "/v1/status")
        assert status["node"] == "db5" and status["modules"]["vmagent"]["state"] == "joined"
        await eventually(lambda: _mesh_ready(sock), 20, what="the host's clustermesh ready")
        r = await asyncio.to_thread(plexus, "status", "--socket", str(sock))
        assert r.returncode == 0 and "vmagent" in r.stdout, r.stderr
        for f in (state / "etcd" / "client.key", state / "vmagent.yaml"):
            assert os.stat(f).st_mode & 0o777 == 0o600, f

        # Killed: withdrawn within its lease; lost; back on restart with `plexus vmagent`.
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait()
        await eventually(lambda: _gone(kv), 4 + 2, interval=0.1, what="withdrawn within lease + 2 s")
        assert await state_of(admin, "db5") == "lost"
        procs.append(vmagent(tmp_path, "vmagent", "--config", str(state / "vmagent.yaml")))
        await eventually(lambda: _joined(admin), 30, what="the host back")

        # Stop is not remove: a stopped agent's record stays until its lease runs out.
        stop_pid(procs[-1])
        assert await kv.get(f"{IPCACHE_PREFIX}/{VM_IP}") is not None
        procs.append(vmagent(tmp_path, "vmagent", "--config", str(state / "vmagent.yaml")))
        await eventually(lambda: _joined(admin), 30, what="the host back")

        # Revoked: gone from the cluster; the running agent says why.
        r = await asyncio.to_thread(plexus, "vm", "delete", "db5", *admin)
        assert r.returncode == 0, r.stderr
        assert "certificate" in r.stdout and "revoked" in r.stdout
        await eventually(lambda: _gone(kv), 10, what="revoked host withdrawn")
        assert await listed(admin) == []
        await eventually(lambda: _refused(sock), 20, what="the agent reports the refusal")
        r = await asyncio.to_thread(plexus, "vm", "delete", "db5", *admin)
        assert r.returncode == 1 and "no VM db5" in r.stderr
    finally:
        for p in procs:
            stop_pid(p)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()


async def _joined(admin: list[str]) -> bool:
    rows = await listed(admin)
    return bool(rows) and rows[0]["state"] == "joined" and rows[0]["identity"] is not None


async def _gone(kv: KvStore) -> bool:
    return await kv.get(f"{IPCACHE_PREFIX}/{VM_IP}") is None


async def _mesh_ready(sock: Path) -> bool:
    st = await asyncio.to_thread(Client(sock).get, "/v1/clustermesh/status")
    return bool(st["clusters"].get("east", {}).get("ready"))


async def _refused(sock: Path) -> bool:
    st = await asyncio.to_thread(Client(sock).get, "/v1/vm")
    return st["state"] in ("refused", "retrying") and "revoked" in st["lastError"]

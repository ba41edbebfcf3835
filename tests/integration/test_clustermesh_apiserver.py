"""The clustermesh-apiserver program against a real etcd: /healthz, /metrics, its status command."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clustermesh.kvstore import KvStore
from clustermesh.models import EndpointRegistration, endpoint_registration_key
from tests.support import ROOT, Etcd, eventually, free_port, stop_pid


@contextmanager
def apiserver_process(tmp_path: Path, etcd: Etcd, metrics_port: int) -> Iterator[Path]:
    sock = tmp_path / "apiserver.sock"
    log = tmp_path / "apiserver.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plexus", "clustermesh-apiserver", "--cluster-name", "east",
             "--cluster-id", "1", "--etcd", etcd.endpoint, "--api-socket", str(sock),
             "--metrics-port", str(metrics_port)], cwd=ROOT, stderr=logf)
    try:
        yield sock
    finally:
        stop_pid(proc)
        assert proc.returncode == 0, log.read_text()[-2000:]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def status(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", "clustermesh-apiserver", "status",
                           "--socket", str(sock), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def status_json(sock: Path) -> dict[str, Any]:
    r = status(sock, "-o", "json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


async def test_healthz_metrics_and_status(tmp_path: Path, etcd: Etcd) -> None:
    port = free_port()
    with apiserver_process(tmp_path, etcd, port) as sock:
        await eventually(lambda: http_get(port, "/healthz")[0] == 200, 30, what="/healthz ok")
        health = json.loads(http_get(port, "/healthz")[1])
        assert health["ok"] and health["ready"] and health["health"] == {
            "apiserver": "ok", "vmsigner": "ok", "egress": "ok"}  # egress: probing its nodes

        async with KvStore([etcd.endpoint]) as kv:
            await kv.put(endpoint_registration_key("east", "n1", "c1"), EndpointRegistration(
                ip="10.1.1.5", namespace="default", pod_name="web", labels={"app": "web"},
                node="n1", host_ip="172.31.1.11").to_json())
            await kv.put(endpoint_registration_key("east", "n1", "bad"), "not json")

        def written() -> str:
            text = http_get(port, "/metrics")[1]
            puts = metric(text, 'plexus_clustermesh_apiserver_writes_total{op="put"}')
            return text if puts and puts >= 1 else ""

        text = await eventually(written, 15, what="the endpoint written")
        assert metric(text, "plexus_clustermesh_apiserver_ready") == 1.0
        assert metric(text, 'plexus_clustermesh_apiserver_source_synced{source="registrations"}') == 1.0
        assert metric(text, 'plexus_clustermesh_apiserver_source_synced{source="services"}') == 1.0
        assert metric(text, "plexus_clustermesh_apiserver_identities_allocated_total") == 1.0
        assert metric(text, "plexus_clustermesh_apiserver_etcd_errors_total") == 0.0

        s = status_json(sock)
        a = s["modules"]["apiserver"]
        assert s["cluster"] == "east" and s["clusterID"] == 1 and a["health"] == "ok"
        assert a["ready"] and a["endpoints"] == 1 and a["identitiesAllocated"] == 1
        assert a["written"]["puts"] >= 1
        assert {n: p["synced"] for n, p in a["prefixes"].items()} == {"registrations": True,
                                                                      "services": True,
                                                                      "vms": True}
        assert list(a["rejected"]) == [endpoint_registration_key("east", "n1", "bad")]
        assert a["etcdErrors"] == 0 and a["lastError"] == ""
        table = status(sock)
        assert table.returncode == 0, table.stderr
        assert "registrations  yes" in table.stdout and "identities allocated 1" in table.stdout

        # etcd goes away: health says so, status shows the error; back again, healthy again
        etcd.stop()
        await eventually(lambda: http_get(port, "/healthz")[0] == 503, 30, what="/healthz 503")
        await eventually(lambda: status_json(sock)["modules"]["apiserver"]["lastError"], 30,
                         what="the etcd error in status")
        down = status_json(sock)["modules"]["apiserver"]
        assert down["etcdErrors"] >= 1 and not down["ready"]
        assert not all(p["synced"] for p in down["prefixes"].values())
        etcd.start()
        await eventually(lambda: http_get(port, "/healthz")[0] == 200, 60, what="/healthz ok again")
        up = status_json(sock)["modules"]["apiserver"]
        assert all(p["synced"] and p["relists"] >= 2 for p in up["prefixes"].values())


def test_status_without_a_running_apiserver_says_so(tmp_path: Path) -> None:
    r = status(tmp_path / "none.sock")
    assert r.returncode == 1 and "no API at" in r.stderr

"""The node agent as a real process: status, metrics, endpoint API, clean SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from plexus.core.client import Client, ClientError
from tests.support import free_port, start_agent, stop_pid

ROOT = Path(__file__).resolve().parents[2]


def start(tmp_path: Path, metrics_port: int) -> tuple[subprocess.Popen[bytes], Path]:
    agent = start_agent(tmp_path, metrics_port=metrics_port)
    return agent.proc, agent.socket


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_agent_serves_status_metrics_and_endpoints(tmp_path: Path) -> None:
    port = free_port()
    proc, sock = start(tmp_path, port)
    try:
        r = cli("status", "--socket", str(sock), "-o", "json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["cluster"] == "east" and status["node"] == "n1"
        assert set(status["modules"]) >= {"endpoints", "clustermesh"}

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "# HELP plexus_reconcile_total" in body

        api = Client(sock)
        ep = {"container_id": "c1", "ip": "10.1.1.2", "namespace": "default",
              "pod_name": "web", "labels": {"app": "web"}, "host_ifname": "plxc1"}
        api.post("/v1/endpoints", ep)
        assert [e["ip"] for e in api.get("/v1/endpoints")] == ["10.1.1.2"]
        try:
            api.post("/v1/endpoints", {**ep, "ip": ""})
            raise AssertionError("an empty IP must be refused")
        except ClientError as e:
            assert e.status == 400 and "ip" in str(e)
    finally:
        stop_pid(proc)
    assert proc.returncode == 0
    assert not sock.exists()

    # A restart restores what was registered.
    proc, sock = start(tmp_path, free_port())
    try:
        assert [e["pod_name"] for e in Client(sock).get("/v1/endpoints")] == ["web"]
    finally:
        stop_pid(proc)


def test_status_without_agent_says_so(tmp_path: Path) -> None:
    r = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "agent is not running" in r.stderr


def test_agent_with_bad_config_exits_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("cluster: {name: east, id: 1}\nnode: {name: n1}\n")
    r = cli("agent", "--config", str(cfg))
    assert r.returncode == 2
    assert "node.ip: required field is missing" in r.stderr

"""The clustermesh-apiserver program's graph, config and command line, without running it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from clustermesh.apiserver_module import APISERVER
from plexus.cli import main, parser
from plexus.clustermesh_apiserver import MODULES, build, healthz, load_config
from plexus.core.config import ConfigError


def config(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"cluster": {"name": "east", "id": 1}, "etcd": {"endpoints": ["http://127.0.0.1:1"]},
            "apiSocket": str(tmp_path / "api.sock"), **extra}


async def test_graph_builds_without_starting_and_is_not_healthy_yet(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path), MODULES)
    assert cfg.metrics.port == 9963
    app = build(cfg, MODULES)
    assert list(app.components) == ["apiserver", "vmsigner", "egress"]
    assert not any(app.hive._tasks.values()), "building must not start work"
    server = app.hive.require(APISERVER)
    assert server.cluster == "east" and server.gc.grace == 300.0
    health = await healthz(app)
    assert health["ok"] is False and health["ready"] is False
    metrics = generate_latest(app.hive.metrics.registry).decode()
    assert "plexus_clustermesh_apiserver_ready 0.0" in metrics
    assert 'plexus_clustermesh_apiserver_source_synced{source="registrations"} 0.0' in metrics
    assert 'plexus_clustermesh_apiserver_writes_total{op="put"} 0.0' in metrics
    status = app.status()["apiserver"]
    assert status["prefixes"]["services"]["prefix"] == "plexus/manifests/v1/east/Service/"
    await app.stop()


def test_module_section_and_bad_values_are_config_errors(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, apiserver={"identityGcGrace": 5}), MODULES)
    assert build(cfg, MODULES).hive.require(APISERVER).gc.grace == 5
    with pytest.raises(ConfigError, match=r"cluster\.name"):
        load_config(config(tmp_path, cluster={"name": "Bad_Name", "id": 1}), MODULES)
    with pytest.raises(ConfigError, match="colour: unknown field"):
        load_config(config(tmp_path, colour="red"), MODULES)


def test_command_line_runs_or_shows_status(capsys: pytest.CaptureFixture[str]) -> None:
    run = parser().parse_args(["clustermesh-apiserver", "--cluster-name", "east", "--cluster-id",
                               "1", "--etcd", "http://127.0.0.1:2379", "--metrics-port", "0"])
    assert run.func.__name__ == "_apiserver" and run.metrics_port == 0
    st = parser().parse_args(["clustermesh-apiserver", "status", "--cluster", "east", "-o", "json"])
    assert st.func.__name__ == "_apiserver_status" and st.output == "json"
    assert main(["clustermesh-apiserver", "--cluster-name", "east"]) == 2
    assert "--cluster-id, --etcd required" in capsys.readouterr().out

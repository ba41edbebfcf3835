"""The kvstoremesh program's graph, config and command line, without running it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from clustermesh.kvstoremesh_module import KVSTOREMESH
from plexus.cli import main
from plexus.core.config import ConfigError
from plexus.kvstoremesh import MODULES, build, healthz, load_config


def config(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"cluster": {"name": "east", "id": 1}, "etcd": {"endpoints": ["http://127.0.0.1:1"]},
            "configDir": str(tmp_path / "mesh"), "apiSocket": str(tmp_path / "api.sock"), **extra}


async def test_graph_builds_without_starting_and_reports_per_cluster(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path), MODULES)
    assert cfg.metrics.port == 9964
    app = build(cfg, MODULES)
    assert list(app.components) == ["kvstoremesh"]
    assert not any(app.hive._tasks.values()), "building must not start work"
    mesh = app.hive.require(KVSTOREMESH)
    assert (mesh.cluster, mesh.cluster_id, mesh.config_dir) == ("east", 1, tmp_path / "mesh")
    health = await healthz(app)
    assert health["ready"] is True  # no remote known: nothing left to copy
    status = app.status()["kvstoremesh"]
    assert (status["cluster"], status["ready"], status["clusters"]) == ("east", True, {})
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "west").write_text("endpoints: [oops\n")
    mesh._scan()
    assert "invalid YAML" in app.status()["kvstoremesh"]["clusters"]["west"]["configError"]
    metrics = generate_latest(app.hive.metrics.registry).decode()
    assert "plexus_kvstoremesh_remote_ready" in metrics
    await app.stop()


def test_bad_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.name"):
        load_config(config(tmp_path, cluster={"name": "Bad_Name", "id": 1}), MODULES)
    with pytest.raises(ConfigError, match="colour: unknown field"):
        load_config(config(tmp_path, colour="red"), MODULES)


def test_command_line_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kvstoremesh", "--cluster-name", "east", "--cluster-id", "1"]) == 2
    assert "--etcd, --config-dir required" in capsys.readouterr().out

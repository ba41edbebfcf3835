"""The shape of the project: import boundaries and the module graph."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from plexus.agent import build, config_model
from plexus.app import MODULES

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.split("Contracts:")[-1].split("kept")[0] or "0 broken" in r.stdout


def test_whole_graph_builds_without_starting(tmp_path: Path) -> None:
    cfg = config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path),
    })
    app = build(cfg, MODULES)
    assert list(app.components) == [m.name for m in MODULES]
    assert not any(app.hive._tasks.values()), "building must not start work"
    assert ("GET", "/v1/endpoints") in app.hive.routes.paths()


def test_module_names_are_unique() -> None:
    names = [m.name for m in MODULES]
    assert len(names) == len(set(names))


def test_core_and_shared_models_type_check_strictly() -> None:
    exe = shutil.which("mypy", path=str(Path(sys.executable).parent)) or "mypy"
    r = subprocess.run([exe, "--strict", "--no-incremental", "plexus/core", "clustermesh/models.py",
                        "clustermesh/tables.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

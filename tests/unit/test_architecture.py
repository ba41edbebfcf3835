"""The shape of the project: import boundaries and the module graph."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tomllib
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


def test_mypy_config_is_strict_and_covers_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert "pydantic.mypy" in config["plugins"]
    assert "ignore_missing_imports" not in config, "only per-module overrides, for untyped libraries"
    lint = configparser.ConfigParser()
    lint.read(ROOT / ".importlinter")
    packages = lint["importlinter"]["root_packages"].split()
    assert set(config["packages"]) == {*packages, "tests", "bench"}


def test_the_whole_project_type_checks_strictly() -> None:
    # The cache (.mypy_cache, ignored by git) makes reruns fast; a cold run takes seconds.
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert r.returncode == 0, "\n".join(errors) or r.stdout + r.stderr

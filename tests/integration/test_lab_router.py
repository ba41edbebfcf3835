"""The lab router's BIRD config is accepted by the real BIRD 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

from plexus.lab.lab import Lab


def test_bird_parses_the_router_config(tmp_path: Path) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(Lab(root=tmp_path).bird_config())
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr

    conf.write_text(Lab(root=tmp_path).bird_config().replace("neighbor", "neighbour", 1))
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0  # the check above could fail

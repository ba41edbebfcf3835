from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from plexus.lab.lab import Lab
from tests.e2e.labs import lab_namespaces, plexus


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The whole lab, up for one test module and down after it. Its clustermesh mode is the
    module's `MESH_MODE`, else $PLEXUS_E2E_MESH_MODE, else direct."""
    mode = getattr(request.module, "MESH_MODE", os.environ.get("PLEXUS_E2E_MESH_MODE", "direct"))
    if lab_namespaces():  # a lab left up by an earlier run: take it down first
        plexus("lab", "down")
        assert not lab_namespaces(), "a lab is up and `plexus lab down` could not remove it"
    r = plexus("lab", "up", *(["--kvstoremesh"] if mode == "kvstoremesh" else []))
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        lab = Lab(say=lambda _line: None)
        assert lab.mesh_mode == mode
        yield lab
    finally:
        plexus("lab", "down")

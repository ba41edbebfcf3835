from __future__ import annotations

from collections.abc import Iterator

import pytest

from plexus.lab.lab import Lab
from tests.e2e.labs import lab_namespaces, plexus


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """The whole lab, up for one test module and down after it."""
    if lab_namespaces():  # a lab left up by an earlier run: take it down first
        plexus("lab", "down")
        assert not lab_namespaces(), "a lab is up and `plexus lab down` could not remove it"
    r = plexus("lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield Lab(say=lambda _line: None)
    finally:
        plexus("lab", "down")

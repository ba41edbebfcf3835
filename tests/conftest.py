from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from plexus.lab.ops import hold_machine_lock
from tests.support import Etcd, etcd_server, sweep_stale_netns


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Markers follow the folder, so a test cannot forget its own.
    for item in items:
        path = str(item.fspath)
        for marker in ("integration", "privileged", "e2e", "chaos"):
            if f"/tests/{marker}/" in path:
                item.add_marker(getattr(pytest.mark, marker))
    if any(item.get_closest_marker(m) for item in items
           for m in ("integration", "privileged", "e2e", "chaos")):
        hold_machine_lock()
        sweep_stale_netns()  # what a killed earlier run left, now that no other run is here



@pytest.fixture
def etcd() -> Iterator[Etcd]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run scripts/setup.sh")
    with etcd_server() as e:
        yield e


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("privileged tests need root (network namespaces, BPF, tc)")

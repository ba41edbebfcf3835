"""Fixtures every chaos test module shares: one lab, brought up once for the whole folder.

- `chaos_lab` (package scope): the lab (`plexus lab up`), up once for every test in
  tests/chaos and down after the last one. East runs a 3-member etcd (172.31.1.250-.252),
  west a single member (172.31.2.250), so both shapes can be hurt. A lab left up by an
  earlier run is taken down first.
- `lab` (per test): `chaos_lab`, whole before the test; after it, whatever the test
  killed is started again (`Lab.up()`), so the next test finds the lab as it was. A test
  undoes its own network cuts (tests/chaos/faults.py `partitioned` does) and deletes the
  pods it made when another test could trip over them.

tests/chaos/faults.py has the tools: `kill` (a process the lab recorded, by PID),
`partitioned` (a namespace cut from addresses), `Probe` (TCP and UDP traffic counted),
`mesh`/`ready`/`endpoint_ips` (what an agent knows).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from plexus.lab import ops
from plexus.lab.lab import Lab
from plexus.lab.topology import default, is_lab_netns, with_etcd_members
from tests.chaos.faults import dead, plexus, ready

ETCD_MEMBERS = {"east": 3, "west": 1}


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="package")
def chaos_lab() -> Iterator[Lab]:
    topo = with_etcd_members(default(), ETCD_MEMBERS)
    if any(is_lab_netns(ns, topo) for ns in ops.namespaces()):
        r = plexus("lab", "down")
        assert r.returncode == 0, r.stdout + r.stderr
    lab = Lab(topo, say=_quiet)
    try:
        lab.up()
        yield lab
    finally:
        r = plexus("lab", "down")
        assert r.returncode == 0, r.stdout + r.stderr


def whole(lab: Lab) -> bool:
    want = {c.name for c in lab.topo.clusters}
    return not dead(lab) and all(set(ready(lab, n)) == want and all(ready(lab, n).values())
                                 for n in lab.topo.nodes())


@pytest.fixture
def lab(chaos_lab: Lab) -> Iterator[Lab]:
    if not whole(chaos_lab):
        chaos_lab.up()
    yield chaos_lab
    if dead(chaos_lab):
        chaos_lab.up()

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from plexus.cni.errors import IP_EXHAUSTED, CniError
from plexus.cni.ipam import Ipam


def test_allocates_hosts_only_and_is_idempotent(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.1.1.0/29")
    a = ipam.allocate("c1", "eth0")
    assert a == "10.1.1.1"
    assert ipam.allocate("c1", "eth0") == a
    assert ipam.allocate("c1", "eth1") != a
    assert ipam.lookup("c1", "eth0") == a


def test_survives_a_restart(tmp_path: Path) -> None:
    first = Ipam(tmp_path, "10.1.1.0/29")
    taken = {first.allocate(f"c{i}", "eth0") for i in range(3)}
    again = Ipam(tmp_path, "10.1.1.0/29")  # a new process sees the same store
    new = again.allocate("c9", "eth0")
    assert new not in taken
    assert again.allocated()[new] == "c9"


def test_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.1.1.0/30")  # two usable addresses
    ipam.allocate("a", "eth0")
    ipam.allocate("b", "eth0")
    with pytest.raises(CniError) as e:
        ipam.allocate("c", "eth0")
    assert e.value.code == IP_EXHAUSTED
    assert "10.1.1.0/30" in e.value.msg


def test_release_frees_and_is_idempotent(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.1.1.0/30")
    a = ipam.allocate("a", "eth0")
    ipam.allocate("b", "eth0")
    assert ipam.release("a", "eth0") == a
    assert ipam.release("a", "eth0") is None
    assert ipam.release("never", "eth0") is None
    assert ipam.allocate("c", "eth0") == a


def test_freed_address_is_not_reused_at_once(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, "10.1.1.0/28")
    a = ipam.allocate("a", "eth0")
    ipam.release("a", "eth0")
    assert ipam.allocate("b", "eth0") != a


def _grab(args: tuple[str, int]) -> list[str]:
    path, worker = args
    ipam = Ipam(Path(path), "10.1.0.0/24")
    return [ipam.allocate(f"w{worker}-{i}", "eth0") for i in range(20)]


def test_concurrent_processes_never_collide(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_grab, [(str(tmp_path), w) for w in range(4)])
    ips = [ip for r in results for ip in r]
    assert len(ips) == 80
    assert len(set(ips)) == 80
    assert len(Ipam(tmp_path, "10.1.0.0/24").allocated()) == 80

"""AttachOps against a kernel stand-in: what a prune may take off a restarted node's veths."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from bpf import attach
from bpf.ops import Attachment, AttachOps, Ifindexes


class Kernel:
    """The program on each veth ("old": a previous run's, "new": this run's, None: none)."""

    def __init__(self, **links: str | None) -> None:
        self.links = dict(links)
        self.detaching = threading.Event()  # a detach of pod-a has begun
        self.release = threading.Event()  # and may finish

    def attached(self, _program: Any, _netlink: Any, skip: frozenset[str] = frozenset()) -> list[str]:
        return [n for n, prog in self.links.items() if prog and n not in skip]

    def detach(self, ifname: str, _netlink: Any) -> None:
        if ifname == "pod-a":
            self.detaching.set()
            assert self.release.wait(5)
        self.links[ifname] = None

    def attach(self, ifname: str, *_args: Any) -> int:
        self.links[ifname] = "new"
        return 7


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel(**{"pod-a": "old", "pod-b": "old"})
    for name in ("attached", "detach", "attach"):
        monkeypatch.setattr(attach, name, getattr(k, name))
    return k


def attach_ops() -> AttachOps:
    program = SimpleNamespace(fd=3, name="from_pod")
    dp: Any = SimpleNamespace(from_pod=program, to_pod=program, from_pod_l3=program,
                              to_pod_l3=program)
    return AttachOps(dp, Ifindexes())


async def test_a_prune_keeps_a_program_attached_while_it_was_detaching_another(kernel: Kernel) -> None:
    target = attach_ops()
    # The prune read its rows before pod-b's row came (a restart deriving meanwhile) ...
    pruning = asyncio.create_task(target.prune([]))
    await asyncio.to_thread(kernel.detaching.wait, 5)
    # ... and pod-b's program is attached while it waits on pod-a's detach.
    await target.update(Attachment("pod-b"))
    kernel.release.set()
    await pruning
    assert kernel.links == {"pod-a": None, "pod-b": "new"}


async def test_a_prune_takes_off_what_no_row_wants(kernel: Kernel) -> None:
    kernel.release.set()
    target = attach_ops()
    await target.update(Attachment("pod-b"))
    await target.prune([Attachment("pod-b")])
    assert kernel.links == {"pod-a": None, "pod-b": "new"}


async def test_no_derived_table_is_pruned_before_the_first_derivation(tmp_path: Any) -> None:
    from tests.bpf_fixture import bpf_module
    from tests.unit.test_bpf_derive import LOCAL

    module, sources = bpf_module(tmp_path, LOCAL)
    derived = (module.attachments, module.ipcache, module.entries, module.enforced)
    assert not any(t.initialized.is_set() for t in derived)  # their prunes wait on this
    for t in sources.values():
        t.initialized.set()
    await module._open_gates()
    assert all(t.initialized.is_set() for t in derived)

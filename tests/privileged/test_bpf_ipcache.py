"""The ipcache map written through the reconciler: a batch leaves what one-by-one leaves."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf.loader import Datapath
from bpf.ops import IpcacheEntry, IpcacheOps
from plexus.core.reconciler import Reconciler
from plexus.core.tables import Table
from tests.support import eventually

# bcc itself warns that the loader hands it the program as text
pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")


@pytest.fixture
def dp(root: None, tmp_path: Path) -> Iterator[Datapath]:
    fs = tmp_path / "bpffs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "plx-test", str(fs)], check=True)
    try:
        yield Datapath(fs / "plexus")
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def _row(i: int, identity: int) -> IpcacheEntry:
    prefix = f"10.9.{i >> 8}.{i & 255}/32" if i % 7 else f"10.{100 + i % 50}.{i >> 8}.0/24"
    return IpcacheEntry(prefix, identity, "172.31.1.11" if i % 3 else "", i % 2)


async def test_full_sync_in_batches_matches_one_by_one(dp: Datapath) -> None:
    rows = [_row(i, 1000 + i) for i in range(3000)]
    expected = {r.prefix: (r.identity, r.host_ip, r.flags) for r in rows}
    assert len(expected) == len(rows)
    # one by one, as `update` writes them
    for r in rows:
        await IpcacheOps(dp).update(r)
    assert dp.ipcache_items() == expected
    dp.ipcache.clear()
    # through the reconciler, which sends the burst in batches
    table: Table[str, IpcacheEntry] = Table("ipcache", key=lambda e: e.key)
    rec = Reconciler("ipcache", table, IpcacheOps(dp), prune_interval=3600, batch_size=512)
    for r in rows:
        table.upsert(r)
    task = asyncio.create_task(rec.run())
    await eventually(lambda: rec.settled() and len(rec.applied) == len(rows))
    assert dp.ipcache_items() == expected
    # a single change and a delete afterwards
    table.upsert(IpcacheEntry(rows[5].prefix, 77, "", 0))
    table.delete(rows[6].prefix)
    await eventually(lambda: rec.settled() and len(rec.applied) == len(rows) - 1)
    items = dp.ipcache_items()
    assert items[rows[5].prefix] == (77, "", 0) and rows[6].prefix not in items
    task.cancel()

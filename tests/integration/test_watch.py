"""The list/watch helper against a real etcd: compaction, disconnection, relist."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from clustermesh.kvstore import KV, KvStore
from clustermesh.watch import Changed, ListWatch, Relisted, Synced, Update
from plexus.core.reconciler import Backoff
from tests.support import Etcd, TcpProxy, eventually


class Follower:
    """Applies a ListWatch's updates to a dict, as a consumer would, and keeps what it saw."""

    def __init__(self, watch: ListWatch) -> None:
        self.watch = watch
        self.state: dict[str, bytes] = {}
        self.seen: list[Update] = []

    async def run(self) -> None:
        async for update in self.watch.updates():
            self.seen.append(update)
            if isinstance(update, Relisted):
                for key in update.vanished:
                    self.state.pop(key, None)
                self.state.update({i.key: i.value for i in update.items})
            elif isinstance(update, Changed):
                for ev in update.events:
                    if ev.kind == "put":
                        self.state[ev.key] = ev.value
                    else:
                        self.state.pop(ev.key, None)

    def relists(self) -> list[Relisted]:
        return [u for u in self.seen if isinstance(u, Relisted)]

    def synced(self) -> list[Synced]:
        return [u for u in self.seen if isinstance(u, Synced)]


@asynccontextmanager
async def following(watch: ListWatch) -> AsyncIterator[Follower]:
    f = Follower(watch)
    task = asyncio.create_task(f.run())
    try:
        yield f
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_relist_after_compaction_while_disconnected(etcd: Etcd) -> None:
    url = urllib.parse.urlsplit(etcd.endpoint)
    assert url.hostname is not None and url.port is not None
    proxy = TcpProxy(url.hostname, url.port)
    await proxy.start()
    async with KvStore([etcd.endpoint]) as admin, KvStore([proxy.endpoint], timeout=2) as kv:
        await admin.put("cm/keep", "1")
        await admin.put("cm/gone", "1")
        await admin.put("elsewhere", "x")
        watch = ListWatch(kv, "cm/", reconnect=Backoff(initial=0.1, maximum=0.5))
        async with following(watch) as f:
            await eventually(lambda: watch.status.synced, 10, what="first list")
            assert f.state == {"cm/keep": b"1", "cm/gone": b"1"}
            assert f.synced() == [Synced(f.relists()[0].revision, first=True)]
            await admin.put("cm/live", "1")
            await eventually(lambda: "cm/live" in f.state, 10, what="a watched put")

            await proxy.cut()
            await eventually(lambda: not watch.status.synced, 15, what="the cut noticed")
            await admin.delete("cm/gone")
            await admin.put("cm/new", "2")
            await admin.put("cm/keep", "3")
            revision = await admin.put("elsewhere", "y")
            await admin.compact(revision)
            await proxy.start()

            await eventually(lambda: len(f.synced()) == 2, 20, what="synced again after relist")
            assert f.state == {"cm/keep": b"3", "cm/live": b"1", "cm/new": b"2"}
            last = f.relists()[-1]
            assert last.vanished == {"cm/gone"}
            assert last.revision >= revision
            assert f.synced()[-1] == Synced(last.revision, first=False)
            assert watch.status.errors >= 1 and watch.status.last_error
            assert watch.keys == set(f.state)

            # and the watch runs again after the relist
            await admin.delete("cm/live")
            await eventually(lambda: "cm/live" not in f.state, 10, what="a delete after relist")
    await proxy.cut()


class CompactingOnFirstList(KvStore):
    """A real kvstore that, right after its first list, changes the prefix and compacts etcd,
    so the watch from the listed revision finds it compacted."""

    listed = 0

    async def list_prefix(self, prefix: str) -> tuple[list[KV], int]:
        items, revision = await super().list_prefix(prefix)
        self.listed += 1
        if self.listed == 1:
            await self.delete("c/a")
            await self.put("c/b", "2")
            await self.compact(await self.put("c/c", "3"))
        return items, revision


async def test_a_compacted_watch_relists(etcd: Etcd) -> None:
    async with CompactingOnFirstList([etcd.endpoint]) as kv:
        await kv.put("c/a", "1")
        watch = ListWatch(kv, "c/")
        async with following(watch) as f:
            await eventually(lambda: len(f.synced()) == 2, 10, what="a relist after compaction")
            assert watch.status.compactions == 1 and watch.status.relists == 2
            assert [type(u) for u in f.seen] == [Relisted, Synced, Relisted, Synced]
            assert f.relists()[1].vanished == {"c/a"}
            assert f.state == {"c/b": b"2", "c/c": b"3"}
            assert watch.status.errors == 0 and watch.status.synced

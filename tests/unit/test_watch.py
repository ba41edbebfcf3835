"""ListWatch over a scripted kvstore: the order of updates, relists, vanished keys, retries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from clustermesh.kvstore import KV, Compacted, Event, Unavailable
from clustermesh.watch import Changed, ListWatch, Relisted, Synced, Update
from plexus.core.reconciler import Backoff


class ScriptedStore:
    """Lists answer from `lists` in turn; each watch yields its batches and then raises."""

    def __init__(self, lists: list[dict[str, bytes] | Exception],
                 watches: list[tuple[list[list[Event]], Exception]]) -> None:
        self.lists = lists
        self.watches = watches
        self.revision = 10
        self.watched_from: list[int] = []

    async def list_prefix(self, prefix: str) -> tuple[list[KV], int]:
        answer = self.lists.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.revision += 10
        return [KV(k, v, self.revision) for k, v in sorted(answer.items())], self.revision

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[list[Event], int]]:
        self.watched_from.append(start_revision)
        batches, end = self.watches.pop(0)
        for batch in batches:
            yield batch, start_revision
        raise end


def put(key: str) -> Event:
    return Event("put", key, b"v", 1)


def delete(key: str) -> Event:
    return Event("delete", key, b"", 1)


async def take(watch: ListWatch, n: int) -> list[Update]:
    out: list[Update] = []
    async for u in watch.updates():
        out.append(u)
        if len(out) == n:
            break
    return out


async def test_list_synced_changes_then_a_compaction_relists_with_vanished_keys() -> None:
    store = ScriptedStore(
        lists=[{"p/a": b"1", "p/b": b"1"}, {"p/b": b"2", "p/c": b"1"}],
        watches=[([[put("p/x")], [], [delete("p/a")]], Compacted(15)),
                 ([], Unavailable("end"))])
    watch = ListWatch(store, "p/")
    got = await take(watch, 6)
    assert [type(u) for u in got] == [Relisted, Synced, Changed, Changed, Relisted, Synced]
    first, relist = got[0], got[4]
    assert isinstance(first, Relisted) and first.vanished == frozenset()
    assert got[1] == Synced(20, first=True)
    assert got[2] == Changed((put("p/x"),), 21)  # progress notifications are not yielded
    # p/a was deleted by the watch, p/x came by the watch and went while the watch was blind
    assert isinstance(relist, Relisted) and relist.vanished == {"p/x"}
    assert got[5] == Synced(30, first=False)
    assert store.watched_from == [21]
    assert watch.status.compactions == 1 and watch.status.relists == 2
    assert watch.keys == {"p/b", "p/c"}


async def test_keys_change_only_once_the_consumer_asks_for_more() -> None:
    store = ScriptedStore(lists=[{"p/a": b"1"}], watches=[([[delete("p/a")]], Unavailable("x"))])
    watch = ListWatch(store, "p/")
    updates = watch.updates()
    assert isinstance(await anext(updates), Relisted)
    assert watch.keys == set()  # not applied yet
    assert isinstance(await anext(updates), Synced)
    assert watch.keys == {"p/a"}
    assert isinstance(await anext(updates), Changed)
    assert watch.keys == {"p/a"}
    await updates.aclose()
    assert not watch.status.synced  # nobody follows the prefix any more


async def test_without_reconnect_errors_end_the_iteration() -> None:
    store = ScriptedStore(lists=[{}], watches=[([], Unavailable("stream ended"))])
    watch = ListWatch(store, "p/")
    with pytest.raises(Unavailable):
        await take(watch, 10)
    assert not watch.status.synced and watch.status.errors == 1
    assert watch.status.last_error == "stream ended"


async def test_with_reconnect_errors_wait_with_backoff_and_relist() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    store = ScriptedStore(lists=[{"p/a": b"1"}, Unavailable("down"), Unavailable("down"), {}],
                          watches=[([], Unavailable("cut")), ([], Unavailable("end"))])
    watch = ListWatch(store, "p/", reconnect=Backoff(initial=1, maximum=10, jitter=0), sleep=sleep)
    got = await take(watch, 4)
    assert [type(u) for u in got] == [Relisted, Synced, Relisted, Synced]
    assert isinstance(got[2], Relisted) and got[2].vanished == {"p/a"}
    assert slept == [1, 2, 4]  # the watch cut, then two failed lists
    assert watch.status.errors == 3

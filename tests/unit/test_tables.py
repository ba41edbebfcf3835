from __future__ import annotations

import asyncio
from dataclasses import dataclass

from plexus.core.tables import Table


@dataclass(frozen=True)
class Row:
    name: str
    value: int


def table() -> Table[str, Row]:
    return Table("rows", key=lambda r: r.name)


def test_upsert_reports_change_only_when_different() -> None:
    t = table()
    assert t.upsert(Row("a", 1))
    assert not t.upsert(Row("a", 1))
    assert t.upsert(Row("a", 2))
    assert t.get("a") == Row("a", 2)
    assert t.revision == 2


async def test_watch_replays_then_coalesces() -> None:
    t = table()
    t.upsert(Row("a", 1))
    feed = t.watch()
    assert await anext(feed) == {"a"}
    for i in range(5):
        t.upsert(Row("b", i))
    t.delete("a")
    assert await anext(feed) == {"a", "b"}
    await feed.aclose()


def test_replace_where_resyncs_a_subset() -> None:
    t = table()
    for n in ("x1", "x2", "y1"):
        t.upsert(Row(n, 0))
    t.replace_where(lambda r: r.name.startswith("x"), [Row("x2", 1), Row("x3", 0)])
    assert sorted(r.name for r in t) == ["x2", "x3", "y1"]
    assert t.get("x2") == Row("x2", 1)


async def test_initialized_waits_for_every_initializer() -> None:
    t = table()
    done_a = t.register_initializer("a")
    done_b = t.register_initializer("b")
    assert not t.initialized.is_set()
    done_a()
    assert not t.initialized.is_set()
    assert t.pending_initializers == {"b"}
    done_b()
    await asyncio.wait_for(t.initialized.wait(), 1)


def test_a_tracker_collects_the_keys_written_since_it_was_last_taken() -> None:
    t: Table[str, tuple[str, int]] = Table("t", key=lambda r: r[0])
    t.upsert(("before", 1))
    tracker = t.track()
    assert tracker.take() == set()  # starts empty: what was there is not a change
    t.upsert(("a", 1))
    t.upsert(("a", 2))
    t.upsert(("before", 1))  # no change: not noted
    t.delete("before")
    assert tracker.take() == {"a", "before"}
    assert tracker.take() == set()

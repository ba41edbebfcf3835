"""The kvstore adapter against a real etcd."""

from __future__ import annotations

import asyncio

import pytest

from clustermesh.kvstore import KvStore, Unavailable, prefix_end
from tests.support import Etcd


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_crud_list_pages_and_create_is_exclusive(etcd: Etcd) -> None:
    async with KvStore([etcd.endpoint]) as kv:
        await kv.put_many([(f"p/{i:05d}", str(i)) for i in range(12000)])  # > 2 pages
        items, rev = await kv.list_prefix("p/")
        assert len(items) == 12000 and items[0].key == "p/00000" and rev > 0
        assert await kv.create("x", "1") is True
        assert await kv.create("x", "2") is False
        got = await kv.get("x")
        assert got is not None and got.value == b"1"
        assert await kv.create_many([("y", "1"), ("x", "3")]) is False
        assert await kv.get("y") is None
        assert await kv.delete("x") is True
        assert await kv.delete("x") is False
        # deletes and puts together, over several transactions
        await kv.write_many([(f"p/{i:05d}", "new") for i in range(100, 300)],
                            [f"p/{i:05d}" for i in range(100)])
        items, _ = await kv.list_prefix("p/")
        assert len(items) == 11900 and items[0].key == "p/00100" and items[0].value == b"new"
        assert items[200].value == b"300"
        assert await kv.delete_prefix("p/") == 11900


async def test_watch_from_revision_sees_puts_and_deletes(etcd: Etcd) -> None:
    async with KvStore([etcd.endpoint]) as kv:
        await kv.put("w/a", "1")
        _, rev = await kv.list_prefix("w/")
        seen: list[tuple[str, str]] = []

        async def follow() -> None:
            async for events, _ in kv.watch("w/", rev + 1):
                seen.extend((e.kind, e.key) for e in events)
                if ("delete", "w/a") in seen:
                    return

        task = asyncio.create_task(follow())
        await kv.put("w/b", "2")
        await kv.put("other", "x")
        await kv.delete("w/a")
        await asyncio.wait_for(task, 10)
        assert seen == [("put", "w/b"), ("delete", "w/a")]


async def test_lease_expiry_and_keepalive(etcd: Etcd) -> None:
    async with KvStore([etcd.endpoint]) as kv:
        lease = await kv.grant(5)
        await kv.put("l", "1", lease=lease)
        assert await kv.keepalive_once(lease) > 0
        got = await kv.get("l")
        assert got is not None and got.lease == lease


async def test_unreachable_is_unavailable() -> None:
    async with KvStore(["http://127.0.0.1:1"], timeout=1) as kv:
        with pytest.raises(Unavailable):
            await kv.status()

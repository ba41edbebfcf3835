"""The kvstore adapter against a real 3-member etcd: members die, the client carries on."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from clustermesh.kvstore import Event, KvError, KvStore, Unavailable
from tests.support import Etcd, etcd_cluster, eventually, stop_pid


def kill(member: Etcd) -> None:
    assert member.proc is not None
    member.proc.kill()
    member.proc.wait(10)


def restart(member: Etcd) -> None:
    """The member again, on its data directory: it rejoins with what it had."""
    log = open(member.data_dir.parent / f"{member.name}.log", "ab")
    member.proc = subprocess.Popen(
        ["etcd", "--name", member.name, "--data-dir", str(member.data_dir),
         "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
         "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
         "--logger", "zap", "--log-level", "error"], stdout=log, stderr=log)
    log.close()


async def test_one_member_lost_goes_unnoticed_two_lost_is_unavailable_until_one_returns() -> None:
    with etcd_cluster(3) as members:
        try:
            # a call's time covers an election on a loaded machine (the call is retried through it)
            async with KvStore([m.endpoint for m in members], timeout=15) as kv:
                await kv.put("f/a", "1")
                _, rev = await kv.list_prefix("f/")
                seen: list[Event] = []
                failure: list[BaseException] = []

                async def follow() -> None:
                    try:
                        async for events, _ in kv.watch("f/", rev + 1):
                            seen.extend(events)
                    except KvError as e:
                        failure.append(e)

                task = asyncio.create_task(follow())
                await kv.put("f/b", "2")
                # The first endpoint is the one the channel uses: its member goes.
                kill(members[0])
                for i in range(5):
                    await kv.put(f"f/c{i}", str(i))
                await kv.delete("f/a")
                await eventually(lambda: len(seen) >= 7, 15, what="every event after the loss")
                assert [(e.kind, e.key) for e in seen] == [
                    ("put", "f/b"), *[("put", f"f/c{i}") for i in range(5)], ("delete", "f/a")]
                assert not failure and not task.done()  # one member lost: the watch went on

                # Two of three gone: no quorum; the survivor refuses rather than hangs or
                # serves stale, and the watch on it ends.
                kill(members[1])
                await eventually(lambda: failure, 20, what="the watch on a member without quorum ends")
                assert isinstance(failure[0], Unavailable), failure
                # Reads are refused ("no leader"), never served stale.
                with pytest.raises(Unavailable, match="no leader"):
                    await kv.get("f/b")

                restart(members[1])

                async def read() -> bytes | None:
                    try:
                        got = await kv.get("f/b")
                    except Unavailable:
                        return None
                    return got.value if got else b"missing"

                assert await eventually(read, 30, interval=0.2, what="quorum back") == b"2"
                items, _ = await kv.list_prefix("f/")
                assert len(items) == 6
                task.cancel()
        finally:
            for m in members:
                if m.proc is not None:
                    stop_pid(m.proc)
                    m.proc = None

"""ClusterMesh against poisoned values, failing watchers and bad config files, with real etcd."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import clustermesh.config_dir
import clustermesh.module
from clustermesh.kvstore import KvStore
from clustermesh.models import IPCACHE_PREFIX, Node, NodeAddress, node_registration_key
from clustermesh.tables import IPCACHE
from tests.integration.test_clustermesh import agent, apiserver, connect, etcds, mesh
from tests.support import Etcd, eventually

__all__ = ["etcds"]  # the fixture, shared with the other clustermesh tests

DEEP = 200_000


def ip_entry(ip: str, identity: int = 131077) -> str:
    return json.dumps({"IP": ip, "ID": identity})


async def register_west_node(kv: KvStore) -> None:
    """A west node whose pod CIDR holds the entries these tests write for west."""
    await kv.put(node_registration_key("west", "n1"), Node(
        "n1", "west", 2, addresses=(NodeAddress("InternalIP", "172.31.2.11"),),
        ipv4_alloc_cidr="10.2.0.0/16").to_json())


async def test_a_deeply_nested_value_is_skipped_and_counted_while_listing_and_watching(
        tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    west = etcds["west"]
    deep = b"[" * DEEP + b"]" * DEEP
    async with apiserver("east", etcds["east"]), apiserver("west", west), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        ipcache = app.hive.require(IPCACHE)
        async with KvStore([west.endpoint]) as kv:
            await register_west_node(kv)
            # There before the agent connects: its first list must get past it.
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.1", deep)
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.2", ip_entry("10.2.9.2"))
            connect(tmp_path, "west", west)
            await eventually(lambda: "10.2.9.2/32" in ipcache, 10, what="the entry listed beside it")
            remote = m.remotes["west"]
            st = remote.watcher.status
            await eventually(lambda: st.ready, 10, what="west ready")
            assert st.invalid_entries == 1
            assert "nests" in st.last_invalid
            # Then as a watch event, next to a good one written after it.
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.3", b"{\"a\":" * DEEP + b"1" + b"}" * DEEP)
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.4", ip_entry("10.2.9.4"))
            await eventually(lambda: "10.2.9.4/32" in ipcache, 10, what="the entry watched after it")
        assert st.invalid_entries == 2
        assert "10.2.9.1/32" not in ipcache and "10.2.9.3/32" not in ipcache
        assert st.ready and st.crashes == 0 and st.failures == 0
        assert not remote.task.done()
        assert m.remote_status()["west"]["ready"] is True
        assert m.remote_status()["west"]["invalidEntries"] == 2


async def test_a_watcher_that_raises_is_restarted_and_shown_not_ready_meanwhile(
        tmp_path: Path, etcds: dict[str, Etcd], monkeypatch: pytest.MonkeyPatch) -> None:
    west = etcds["west"]
    async with apiserver("east", etcds["east"]), apiserver("west", west), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        ipcache = app.hive.require(IPCACHE)
        async with KvStore([west.endpoint]) as kv:
            await register_west_node(kv)
        connect(tmp_path, "west", west)
        await eventually(lambda: "west" in m.remotes and m.remotes["west"].watcher.status.ready, 10)
        remote = m.remotes["west"]
        watcher = remote.watcher
        broken = True
        real_apply, real_relist = watcher._apply, watcher._relist

        def apply(*args: Any) -> None:
            if broken:
                raise RuntimeError("boom while applying")
            real_apply(*args)

        def relist(*args: Any) -> None:
            if broken:
                raise RuntimeError("boom while relisting")
            real_relist(*args)

        monkeypatch.setattr(watcher, "_apply", apply)
        monkeypatch.setattr(watcher, "_relist", relist)
        async with KvStore([west.endpoint]) as kv:
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.5", ip_entry("10.2.9.5"))
        await eventually(lambda: watcher.status.crashes >= 2, 10, what="the watcher failed and was restarted")
        status = m.remote_status()["west"]
        assert status["ready"] is False
        assert "RuntimeError: boom while" in status["lastFailure"]
        assert not remote.task.done()
        assert app.hive.health["clustermesh"] == "ok"  # handled: the task did not die
        broken = False
        await eventually(lambda: "10.2.9.5/32" in ipcache, 15, what="the entry after the restart")
        await eventually(lambda: watcher.status.ready, 10, what="ready again")
        assert m.remote_status()["west"]["ready"] is True


async def test_an_apiserver_session_that_raises_is_restarted(etcds: dict[str, Etcd],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async with apiserver("west", etcds["west"]) as server:
        broken = True
        real_sync = server.sync

        async def sync() -> int:
            if broken:
                raise RuntimeError("boom while syncing")
            return await real_sync()

        monkeypatch.setattr(server, "sync", sync)
        async with KvStore([etcds["west"].endpoint]) as kv:
            await kv.put(f"{server.svc_prefix}default/web", "{not json")  # wakes a sync pass
        await eventually(lambda: server.counters.crashes >= 2, 10, what="the session failed and restarted")
        status = server.status()
        assert status["ready"] is False
        assert "RuntimeError: boom while syncing" in status["lastError"]
        assert "malformed JSON" in status["rejected"][f"{server.svc_prefix}default/web"]
        broken = False
        await eventually(lambda: server.ready, 15, what="the apiserver ready again")


async def test_bad_config_files_are_shown_and_the_rest_keeps_working(
        tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    mesh_dir = tmp_path / "mesh"
    async with apiserver("east", etcds["east"]), apiserver("west", etcds["west"]), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        connect(tmp_path, "west", etcds["west"])
        await eventually(lambda: "west" in m.remotes and m.remotes["west"].watcher.status.ready, 10)
        bad = {
            "binary": b"\xff\xfe\x00garbage\x80",
            "wrongtype": b"endpoints: 5\n",
            # a duration as Go decodes it is nanoseconds: Cilium refuses "5s", so does Plexus
            "duration": b"endpoints: ['http://127.0.0.1:1']\ndial-timeout: 5s\n",
            "notyaml": b"endpoints: [oops\n",
            "huge": b"# " + b"x" * (clustermesh.config_dir.MAX_CONFIG_FILE_BYTES + 1) + b"\n",
            "nested": b"[" * 30_000 + b"]" * 30_000,  # under the size limit, too deep for YAML
        }
        for name, content in bad.items():
            (mesh_dir / name).write_bytes(content)
        (mesh_dir / "west.yaml").write_text(f"endpoints: ['{etcds['west'].endpoint}']\n")

        def status() -> dict[str, dict[str, Any]]:
            return m.remote_status()

        await eventually(lambda: all(status().get(n, {}).get("configError") for n in [*bad, "west"]),
                         10, what=lambda: f"every bad file shown: {status()}")
        s = status()
        for name in bad:
            assert s[name]["configFile"] == str(mesh_dir / name)
            assert s[name]["configError"].startswith(str(mesh_dir / name))
            assert s[name]["ready"] is False
        assert "not UTF-8" in s["binary"]["configError"]
        assert "endpoints" in s["wrongtype"]["configError"]
        assert "dial-timeout: Input should be a valid integer" in s["duration"]["configError"]
        assert "invalid YAML" in s["notyaml"]["configError"]
        assert "over the limit" in s["huge"]["configError"]
        assert "2 files for cluster west" in s["west"]["configError"]
        assert str(mesh_dir / "west.yaml") in s["west"]["configFile"]
        assert m.remotes["west"].watcher.status.ready  # the working connection stays

        # The watcher of the directory still sees changes: a new remote, fixes, removals.
        (mesh_dir / "binary").write_text(f"endpoints: ['{etcds['west'].endpoint}']\n")
        await eventually(lambda: "binary" in m.remotes, 10, what="the fixed file connects")
        # The file's error is gone (its session may fail on its own: west's etcd has no
        # cluster-config for "binary", which status shows as a connection problem).
        assert "configFile" not in status()["binary"]
        assert str(mesh_dir / "binary") not in status()["binary"].get("configError", "")
        (mesh_dir / "west.yaml").unlink()
        for name in ("wrongtype", "duration", "notyaml", "huge", "nested"):
            (mesh_dir / name).unlink()
        await eventually(lambda: set(status()) == {"east", "west", "binary"}, 10,
                         what=lambda: f"every removed file forgotten: {status()}")
        assert not status()["west"].get("configError")
        assert m.remotes["west"].watcher.status.ready


async def test_an_unchanged_config_file_is_not_read_again(tmp_path: Path, etcds: dict[str, Etcd],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = clustermesh.config_dir.read_cluster_file

    def counting(path: Path, st: Any) -> Any:
        reads.append(path)
        return real(path, st)

    monkeypatch.setattr(clustermesh.module, "read_cluster_file", counting)
    async with apiserver("east", etcds["east"]), apiserver("west", etcds["west"]), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        path = connect(tmp_path, "west", etcds["west"])
        (tmp_path / "mesh" / "broken").write_text("endpoints: [oops\n")
        await eventually(lambda: "west" in m.remotes and m.remotes["west"].watcher.status.ready, 10)
        await eventually(lambda: m.remote_status().get("broken"), 5)
        seen = len(reads)
        other = tmp_path / "mesh" / "other"
        other.write_text("endpoints: [oops\n")  # a change elsewhere in the directory
        await eventually(lambda: m.remote_status().get("other"), 5, what="the new file read")
        assert reads[seen:] == [other], "unchanged files were read again"
        seen = len(reads)
        before = m.remotes["west"].task
        path.write_text(f"endpoints: ['{etcds['west'].endpoint}']\n# changed\n")
        await eventually(lambda: m.remotes["west"].task is not before, 10, what="the change picked up")
        assert reads[seen:] == [path]


async def test_values_too_large_for_one_page_or_watch_message_still_arrive(etcd: Etcd) -> None:
    # 60 values of 1.4 MB: more than one gRPC message may carry, listed or watched.
    big = b"x" * 1_400_000
    async with KvStore([etcd.endpoint]) as kv:
        start = await kv.status()
        for i in range(60):
            await kv.put(f"big/{i:03d}", big)
        items, _ = await kv.list_prefix("big/")
        assert len(items) == 60 and all(i.value == big for i in items)
        seen: list[str] = []

        async def follow() -> None:
            async for events, _rev in kv.watch("big/", start + 1):
                seen.extend(ev.key for ev in events)
                if len(seen) >= 60:
                    return

        await asyncio.wait_for(follow(), 30)
        assert seen == [f"big/{i:03d}" for i in range(60)]

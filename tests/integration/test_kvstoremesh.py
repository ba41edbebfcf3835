"""KVStoreMesh with real etcd: west copied into east's etcd in Cilium's layout, an agent of
east reading the whole mesh from its own etcd, and the faults: a remote gone, KVStoreMesh
restarted, a remote removed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from clustermesh.kvstore import KvStore
from clustermesh.kvstoremesh import KVStoreMesh
from clustermesh.models import (
    IPCACHE_PREFIX,
    NODES_PREFIX,
    ClusterConfig,
    Node,
    NodeAddress,
    endpoint_registration_key,
)
from clustermesh.module import ClusterMesh
from plexus.agent import build, config_model
from plexus.app import MODULES
from plexus.core.module import App
from tests.integration.test_clustermesh import (
    IDS,
    apiserver,
    etcds,  # noqa: F401  (fixture)
    register_node,
    register_pod,
    unregister,
)
from tests.support import Etcd, eventually

pytestmark = pytest.mark.integration


@asynccontextmanager
async def kvstoremesh(tmp_path: Path, east: Etcd) -> AsyncIterator[KVStoreMesh]:
    (tmp_path / "kvsm").mkdir(exist_ok=True)
    kv = KvStore([east.endpoint])
    km = KVStoreMesh(kv, "east", IDS["east"], tmp_path / "kvsm", tick=0.1)
    task = asyncio.create_task(km.run())
    try:
        yield km
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()


@asynccontextmanager
async def cached_agent(tmp_path: Path, east: Etcd) -> AsyncIterator[App]:
    cfg = config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": IDS["east"]},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path / "state"),
        "clustermesh": {"etcd": {"endpoints": [east.endpoint]}, "mode": "kvstoremesh",
                        "configDir": str(tmp_path / "mesh"), "directRoutes": False},
    })
    (tmp_path / "mesh").mkdir(exist_ok=True)
    # Which clusters: the agent reads the names (an empty file will do); what it reads comes
    # from its own etcd.
    (tmp_path / "mesh" / "west").write_text("")
    app = build(cfg, MODULES)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def mesh(app: App) -> ClusterMesh:
    comp = app.components["clustermesh"]
    assert isinstance(comp, ClusterMesh)
    return comp


async def local_keys(east: Etcd, prefix: str) -> dict[str, bytes]:
    async with KvStore([east.endpoint]) as kv:
        items, _ = await kv.list_prefix(prefix)
    return {i.key: i.value for i in items}


async def test_remote_copied_in_ciliums_layout_and_read_by_an_agent_over_one_connection(
        tmp_path: Path, etcds: dict[str, Etcd]) -> None:  # noqa: F811
    east, west = etcds["east"], etcds["west"]
    async with apiserver("east", east), apiserver("west", west):
        await register_node(west, "west", "w1", "10.2.1.0/24", "172.31.2.11")
        await register_pod(west, "west", "w1", "c1", "10.2.1.5", {"app": "web"})
        async with kvstoremesh(tmp_path, east) as km, cached_agent(tmp_path, east) as app:
            (tmp_path / "kvsm" / "west").write_text(f"endpoints: ['{west.endpoint}']\n")
            await eventually(lambda: km.ready and "west" in km.remotes, 15, what=lambda: str(km.status()))
            # the apiserver publishes the registrations in its own time: wait for the whole copy
            wanted = ["cilium/cache/nodes/v1/west/w1", "cilium/cache/ip/v1/west/10.2.1.5",
                      "cilium/cluster-config/west",
                      *(f"cilium/synced/west/cilium/cache/{kind}/v1"
                        for kind in ("nodes", "services", "identities", "ip"))]
            copied: dict[str, bytes] = {}

            async def copied_all() -> bool:
                copied.clear()
                copied.update(await local_keys(east, "cilium/"))
                return all(k in copied for k in wanted) and any(
                    k.startswith("cilium/cache/identities/v1/west/id/") for k in copied)
            await eventually(copied_all, 30, interval=0.05,
                             what=lambda: f"copied so far: {sorted(copied)}; {km.status()}")
            cfg = ClusterConfig.from_json(copied["cilium/cluster-config/west"])
            assert (cfg.id, cfg.cached, cfg.synced_canaries) == (IDS["west"], True, True)
            assert "cilium/cache/nodes/v1/west/w1" in copied
            assert "cilium/cache/ip/v1/west/10.2.1.5" in copied
            assert any(k.startswith("cilium/cache/identities/v1/west/id/") for k in copied)
            for kind in ("nodes", "services", "identities", "ip"):
                assert f"cilium/synced/west/cilium/cache/{kind}/v1" in copied, kind
            m = mesh(app)
            await eventually(lambda: m.remote_status().get("west", {}).get("ready"), 15,
                             what=lambda: str(m.remote_status()))
            assert m.tables.nodes.get(("west", "w1")) is not None
            assert m.tables.ipcache.get("10.2.1.5/32") is not None
            status = m.remote_status()["west"]
            assert status["nodes"] == 1 and status["endpoints"] >= 1
            assert m.remotes["west"].watcher.kv is m.kv  # one etcd connection for every cluster
            # A value the agent would refuse is not copied either.
            async with KvStore([west.endpoint]) as kv:
                bad = Node("w9", "north", IDS["west"], (NodeAddress("InternalIP", "172.31.2.19"),))
                await kv.put(f"{NODES_PREFIX}/west/w9", bad.to_json())
            await eventually(lambda: km.remotes["west"].writer.status.invalid_entries >= 1, 10)
            assert "cilium/cache/nodes/v1/west/w9" not in await local_keys(east, "cilium/cache/")


async def test_faults_keep_the_copy_and_a_restart_drops_only_what_vanished(
        tmp_path: Path, etcds: dict[str, Etcd]) -> None:  # noqa: F811
    east, west = etcds["east"], etcds["west"]
    async with apiserver("east", east), apiserver("west", west) as west_api:
        await register_node(west, "west", "w1", "10.2.1.0/24", "172.31.2.11")
        await register_pod(west, "west", "w1", "c1", "10.2.1.5", {"app": "web"})
        await register_pod(west, "west", "w1", "c2", "10.2.1.6", {"app": "web"})
        async with cached_agent(tmp_path, east) as app:
            m = mesh(app)
            node_deleted: list[Any] = []

            async def watch_nodes() -> None:
                async for keys in m.tables.nodes.watch(replay=False):
                    node_deleted.extend(k for k in keys if m.tables.nodes.get(k) is None)
            watcher = asyncio.create_task(watch_nodes())
            async with kvstoremesh(tmp_path, east) as km:
                (tmp_path / "kvsm" / "west").write_text(f"endpoints: ['{west.endpoint}']\n")
                await eventually(lambda: m.tables.ipcache.get("10.2.1.6/32") is not None, 15,
                                 what=lambda: f"{km.status()} {m.remote_status()}")
                # The remote goes away: KVStoreMesh keeps its copy, the agent keeps serving.
                west.stop()
                await eventually(lambda: not km.remotes["west"].writer.status.connected, 15)
                assert "cilium/cache/ip/v1/west/10.2.1.6" in await local_keys(east, "cilium/cache/")
                assert m.tables.ipcache.get("10.2.1.6/32") is not None
                west.start()
                await eventually(lambda: km.remotes["west"].writer.status.ready, 30)
            # KVStoreMesh is down; meanwhile a pod goes in west.
            await eventually(lambda: west_api.ready, 15)
            await unregister(west, endpoint_registration_key("west", "w1", "c2"))

            async def gone_in_west() -> bool:
                async with KvStore([west.endpoint]) as kv:
                    return await kv.get(f"{IPCACHE_PREFIX}/10.2.1.6") is None
            for _ in range(300):  # the apiserver withdraws the pod's entry
                if await gone_in_west():
                    break
                await asyncio.sleep(0.05)
            assert await gone_in_west()
            assert m.tables.ipcache.get("10.2.1.6/32") is not None  # nothing removed while down
            assert m.remote_status()["west"]["ready"]
            async with kvstoremesh(tmp_path, east) as km:
                await eventually(lambda: m.tables.ipcache.get("10.2.1.6/32") is None, 15,
                                 what="the stale entry dropped after the resync")
                assert m.tables.ipcache.get("10.2.1.5/32") is not None
                assert not node_deleted, f"node rows flapped: {node_deleted}"
                # Removed from KVStoreMesh's config: the copy goes, and with it the agent's rows.
                (tmp_path / "kvsm" / "west").unlink()
                await eventually(lambda: m.tables.nodes.get(("west", "w1")) is None, 15)
                left = await local_keys(east, "cilium/")
                assert not [k for k in left if "/west/" in k or k.endswith("/west")], left
            watcher.cancel()


def test_cache_layout_is_ciliums() -> None:
    from clustermesh.models import CACHED_SYNCED_PREFIXES, cache_layout
    assert cache_layout("west") == {
        "cilium/state/nodes/v1/west/": "cilium/cache/nodes/v1/west/",
        "cilium/state/ip/v1/default/": "cilium/cache/ip/v1/west/",
        "cilium/state/identities/v1/id/": "cilium/cache/identities/v1/west/id/",
        "cilium/state/services/v1/west/": "cilium/cache/services/v1/west/",
    }
    assert CACHED_SYNCED_PREFIXES == ("cilium/cache/nodes/v1", "cilium/cache/services/v1",
                                      "cilium/cache/identities/v1", "cilium/cache/ip/v1")

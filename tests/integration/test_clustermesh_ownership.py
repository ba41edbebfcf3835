"""A remote cluster writing claims for addresses it does not own, with two real etcds: only
what lies in its own nodes' pod CIDRs reaches the ipcache; the rest is refused, counted
and shown, and judged again when its nodes change."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from clustermesh.kvstore import KvStore
from clustermesh.models import (
    ID_INIT,
    IDENTITIES_PREFIX,
    IPCACHE_PREFIX,
    endpoint_registration_key,
    identity_range,
    node_registration_key,
)
from clustermesh.tables import IDENTITIES, IPCACHE
from plexus.core.api import ApiServer
from tests.integration.test_clustermesh import (
    agent,
    apiserver,
    connect,
    mesh,
    register_node,
    register_pod,
    unregister,
)
from tests.support import Etcd, etcd_server, eventually

ROOT = Path(__file__).resolve().parents[2]
WEST_ID = identity_range(2)[0] + 77


@pytest.fixture
def clusters() -> Iterator[dict[str, Etcd]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(etcd_server(name)) for name in ("east", "west")}


def claim(ip: str, ident: int = WEST_ID) -> str:
    return json.dumps({"IP": ip, "ID": ident, "HostIP": "172.31.2.11"})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


async def test_a_remote_cannot_take_over_addresses_it_does_not_own(
        tmp_path: Path, clusters: dict[str, Etcd]) -> None:
    east, west = clusters["east"], clusters["west"]
    async with apiserver("east", east), apiserver("west", west), agent(tmp_path, east) as app:
        m = mesh(app)
        ipcache = app.hive.require(IPCACHE)
        # east-n2 and its pod 10.1.2.1; 10.2.1.9 is east's too although it lies in west's CIDR
        await register_node(east, "east", "n2", "10.1.2.0/24", "172.31.1.12")
        await register_pod(east, "east", "n2", "e1", "10.1.2.1", {"app": "web"})
        await register_pod(east, "east", "n2", "e2", "10.2.1.9", {"app": "web"})
        await register_node(west, "west", "n1", "10.2.1.0/24", "172.31.2.11")
        async with KvStore([west.endpoint]) as kv:
            await kv.put(f"{IPCACHE_PREFIX}/10.1.2.1", claim("10.1.2.1"))      # east's pod
            await kv.put(f"{IPCACHE_PREFIX}/8.8.8.8", claim("8.8.8.8"))        # the internet
            await kv.put(f"{IPCACHE_PREFIX}/10.2.1.7", claim("10.2.1.7", ID_INIT))  # reserved
            await kv.put(f"{IPCACHE_PREFIX}/10.2.1.8", claim("10.2.1.8"))      # its own
            await kv.put(f"{IPCACHE_PREFIX}/10.2.1.9", claim("10.2.1.9"))      # its own, held by east
            await kv.put(f"{IPCACHE_PREFIX}/10.2.5.5", claim("10.2.5.5"))      # before its node
            await kv.put(f"{IDENTITIES_PREFIX}/1", "k8s:app=web;")            # redefine "host"
        connect(tmp_path, "west", west)
        await eventually(lambda: "west" in m.remotes and m.remotes["west"].watcher.status.ready,
                         15, what="west ready")
        own = await eventually(lambda: ipcache.get("10.2.1.8/32"), 10, what="west's own pod")
        assert own.cluster == "west" and own.identity == WEST_ID

        def holder(prefix: str) -> str | None:
            row = ipcache.get(prefix)
            return row.cluster if row else None

        await eventually(lambda: holder("10.1.2.1/32") == "east" and holder("10.2.1.9/32") == "east",
                         10, what=lambda: f"east's pods: {ipcache.all()}")
        assert ipcache.get("10.1.2.1/32").identity < identity_range(2)[0]  # type: ignore[union-attr]
        for refused in ("8.8.8.8/32", "10.2.1.7/32", "10.2.5.5/32"):
            assert refused not in ipcache
        assert app.hive.require(IDENTITIES).get(1) is None

        def west_status() -> dict[str, Any]:
            return m.remote_status()["west"]  # type: ignore[no-any-return]

        await eventually(lambda: west_status()["refusedEntries"] == 5, 10,
                         what=lambda: f"refusals: {west_status()}")
        reasons = west_status()["refused"]
        assert "not in a pod CIDR or a node address of west" in reasons["10.1.2.1/32"]
        assert "not in a pod CIDR" in reasons["8.8.8.8/32"]
        assert "identity 5 (reserved:init)" in reasons["10.2.1.7/32"]
        assert "held by the local cluster east" in reasons["10.2.1.9/32"]
        assert "not in a pod CIDR" in reasons["10.2.5.5/32"]
        assert west_status()["lastRefused"]
        assert m.remote_status()["east"]["refusedEntries"] == 0
        registry = app.hive.metrics.registry
        assert registry.get_sample_value("plexus_clustermesh_remote_refused_entries",
                                         {"target_cluster": "west"}) == 5.0
        st = m.remotes["west"].watcher.status
        assert st.invalid_entries == 1 and "identity 1 is reserved" in st.last_invalid

        # the CLI shows them, in words and in JSON
        sock = tmp_path / "api.sock"
        server = ApiServer(app.hive.routes, sock, registry)
        await server.start()
        try:
            text = await asyncio.to_thread(cli, "clustermesh", "status", "--socket", str(sock))
            assert text.returncode == 0, text.stderr
            assert "REFUSED" in text.stdout and "refused from west: 5" in text.stdout
            assert "8.8.8.8/32 is not in a pod CIDR" in text.stdout
            js = await asyncio.to_thread(cli, "clustermesh", "status", "--socket", str(sock), "-o", "json")
            assert json.loads(js.stdout)["clusters"]["west"]["refusedEntries"] == 5
        finally:
            await server.stop()

        # east's entries go: west's claim on east's pod IP stays refused (it is not west's
        # address), west's claim inside its own CIDR takes the place east held.
        await unregister(east, endpoint_registration_key("east", "n2", "e1"))
        await unregister(east, endpoint_registration_key("east", "n2", "e2"))
        await eventually(lambda: holder("10.2.1.9/32") == "west", 10, what="west takes 10.2.1.9")
        await eventually(lambda: "10.1.2.1/32" not in ipcache, 10, what="east's pod gone")
        assert "not in a pod CIDR" in west_status()["refused"]["10.1.2.1/32"]

        # the claim that came before its node is accepted once the node arrives, and goes
        # again with the node
        await register_node(west, "west", "n2", "10.2.5.0/24", "172.31.2.12")
        await eventually(lambda: holder("10.2.5.5/32") == "west", 10, what="accepted with its node")
        assert "10.2.5.5/32" not in west_status()["refused"]
        assert west_status()["refusedEntries"] == 3
        await unregister(west, node_registration_key("west", "n2"))
        await eventually(lambda: "10.2.5.5/32" not in ipcache, 10, what="gone with its node")
        assert "10.2.5.5/32" in west_status()["refused"]

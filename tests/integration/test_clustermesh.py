"""ClusterMesh with real etcd: two (or three) clusters, apiservers, an agent's tables."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from clustermesh.apiserver import ApiServer
from clustermesh.kvstore import KvStore
from clustermesh.models import (
    IPCACHE_PREFIX,
    NODES_PREFIX,
    ClusterConfig,
    EndpointRegistration,
    Node,
    NodeAddress,
    endpoint_registration_key,
    format_labels,
    identity_range,
    node_registration_key,
)
from clustermesh.module import ClusterMesh
from clustermesh.tables import GLOBAL_SERVICES, IDENTITIES, IPCACHE, NODES, SERVICES
from plexus.agent import build, config_model
from plexus.app import MODULES
from plexus.core.module import App
from plexus.core.node import ENDPOINTS, NODE_ATTRIBUTES, WIREGUARD_PUBLIC_KEY, Endpoint
from tests.support import Etcd, etcd_server, eventually

IDS = {"east": 1, "west": 2, "north": 3}


@pytest.fixture
def etcds() -> Iterator[dict[str, Etcd]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(etcd_server(name)) for name in ("east", "west")}


@asynccontextmanager
async def apiserver(name: str, etcd: Etcd, **kw: Any) -> AsyncIterator[ApiServer]:
    kv = KvStore([etcd.endpoint])
    server = ApiServer(kv, name, IDS[name], **kw)
    task = asyncio.create_task(server.run())
    try:
        await eventually(server.synced.is_set, 10, what=f"apiserver {name} synced")
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()


@asynccontextmanager
async def agent(tmp_path: Path, etcd: Etcd, cluster: str = "east", node: str = "n1",
                before_start: Callable[[App], None] = lambda _app: None) -> AsyncIterator[App]:
    cfg = config_model(MODULES).model_validate({
        "cluster": {"name": cluster, "id": IDS[cluster]},
        "node": {"name": node, "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path / f"state-{cluster}-{node}"),
        "clustermesh": {"etcd": {"endpoints": [etcd.endpoint]},
                        "configDir": str(tmp_path / "mesh"), "directRoutes": False,
                        "configPollInterval": 0.1},
    })
    (tmp_path / "mesh").mkdir(exist_ok=True)
    app = build(cfg, MODULES)
    before_start(app)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def mesh(app: App) -> ClusterMesh:
    comp = app.components["clustermesh"]
    assert isinstance(comp, ClusterMesh)
    return comp


def connect(tmp_path: Path, name: str, etcd: Etcd | str) -> Path:
    endpoint = etcd.endpoint if isinstance(etcd, Etcd) else etcd
    path = tmp_path / "mesh" / name
    path.write_text(f"endpoints: ['{endpoint}']\n")
    return path


async def register_pod(etcd: Etcd, cluster: str, node: str, cid: str, ip: str,
                       labels: dict[str, str]) -> None:
    async with KvStore([etcd.endpoint]) as kv:
        await kv.put(endpoint_registration_key(cluster, node, cid), EndpointRegistration(
            ip=ip, namespace="default", pod_name=cid, labels=labels, node=node,
            host_ip="172.31.2.11").to_json())


async def register_node(etcd: Etcd, cluster: str, node: str, pod_cidr: str, ip: str) -> None:
    """A node record with its pod CIDR: what makes a remote's pod IPs its own."""
    async with KvStore([etcd.endpoint]) as kv:
        await kv.put(node_registration_key(cluster, node), Node(
            node, cluster, IDS[cluster], (NodeAddress("InternalIP", ip),),
            ipv4_alloc_cidr=pod_cidr).to_json())


async def unregister(etcd: Etcd, key: str) -> None:
    async with KvStore([etcd.endpoint]) as kv:
        await kv.delete(key)


def service_manifest(affinity: str = "none", cluster_ip: str = "10.96.1.10") -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "annotations": {
            "service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})


async def test_remote_pod_appears_with_the_remote_identity(tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    async with apiserver("east", etcds["east"]), apiserver("west", etcds["west"]), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        connect(tmp_path, "west", etcds["west"])
        await register_node(etcds["west"], "west", "n1", "10.2.1.0/24", "172.31.2.11")
        await register_pod(etcds["west"], "west", "n1", "c1", "10.2.1.5", {"app": "db"})
        ipcache = app.hive.require(IPCACHE)
        entry = await eventually(lambda: ipcache.get("10.2.1.5/32"), 10, what="west pod in ipcache")
        lo, hi = identity_range(2)
        assert entry.cluster == "west" and lo <= entry.identity <= hi
        ident = await eventually(lambda: app.hive.require(IDENTITIES).get(entry.identity), 10)
        assert "k8s:io.cilium.k8s.policy.cluster=west" in ident.labels
        assert "k8s:app=db" in ident.labels
        await eventually(lambda: m.remotes["west"].watcher.status.ready, 10, what="west ready")
        status = m.remote_status()
        assert status["west"]["clusterID"] == 2 and status["west"]["endpoints"] == 1
        assert all(status["west"]["synced"].values())

        # The local agent's own pod goes to its apiserver and comes back with east's identity.
        app.hive.require(ENDPOINTS).upsert(Endpoint("own1", "10.1.1.7", "default", "web",
                                                    {"app": "web"}, "plxown"))
        own = await eventually(lambda: ipcache.get("10.1.1.7/32"), 10, what="own pod published")
        assert own.cluster == "east" and identity_range(1)[0] <= own.identity <= identity_range(1)[1]
        nodes = app.hive.require(NODES)
        await eventually(lambda: nodes.get(("east", "n1")), 10, what="own node published")

        # the registrations are the hive's reconcilers, reported as every module's are
        def registrations() -> dict[str, Any]:
            return app.status()["clustermesh"]["reconcilers"]  # type: ignore[no-any-return]

        assert set(registrations()) == {"node-registration", "endpoint-registration"}
        await eventually(lambda: registrations()["endpoint-registration"]["objects"]
                         == {"pending": 0, "done": 1, "error": 0}, 10)
        assert all(r["running"] and r["last_error"] == "" for r in registrations().values())
        assert app.health()["status"] == "ok"


async def test_node_record_waits_for_the_attributes_modules_publish(tmp_path: Path,
                                                                     etcd: Etcd) -> None:
    # A restarted agent must not register its node without its WireGuard key: every peer
    # would drop it until the key came back.
    held: list[Callable[[], None]] = []

    def hold(app: App) -> None:
        held.append(app.hive.require(NODE_ATTRIBUTES).register_initializer("wireguard-key"))

    async with apiserver("east", etcd), agent(tmp_path, etcd, before_start=hold) as app:
        nodes, ipcache = app.hive.require(NODES), app.hive.require(IPCACHE)
        app.hive.require(ENDPOINTS).upsert(Endpoint("own1", "10.1.1.7", "default", "web",
                                                    {"app": "web"}, "plxown"))
        await eventually(lambda: ipcache.get("10.1.1.7/32"), 10, what="own pod published")
        assert nodes.get(("east", "n1")) is None, "the node was registered before its key"
        app.hive.require(NODE_ATTRIBUTES).set(WIREGUARD_PUBLIC_KEY, "k" * 43 + "=")
        held[0]()
        node = await eventually(lambda: nodes.get(("east", "n1")), 10, what="own node published")
        assert node.wireguard_pubkey == "k" * 43 + "="


async def test_annotations_of_the_agent_and_of_its_control_plane_reach_the_node_record(
        tmp_path: Path, etcd: Etcd) -> None:
    """How egress health crosses the mesh: a module annotates its node, the apiserver adds
    its own; either is taken back without touching the other."""
    async with apiserver("east", etcd) as server, agent(tmp_path, etcd) as app:
        nodes = app.hive.require(NODES)
        attrs = app.hive.require(NODE_ATTRIBUTES)
        attrs.annotate("test.plexus.io/note", "from the agent")
        server.annotate_node("n1", "egress.plexus.io/control-plane-unreachable", "3 probes")
        # this agent runs the egress module without its datapath: it says so
        off = {"egress.plexus.io/gateway-unavailable": "the egress datapath is off on this node"}

        def annotated(want: dict[str, str]) -> Any:
            n = nodes.get(("east", "n1"))
            return n if n is not None and n.annotations == {**off, **want} else None

        await eventually(lambda: annotated({"test.plexus.io/note": "from the agent",
                                            "egress.plexus.io/control-plane-unreachable": "3 probes"}),
                         10, what=lambda: f"both annotations on the record: {nodes.get(('east', 'n1'))}")
        server.annotate_node("n1", "egress.plexus.io/control-plane-unreachable", None)
        await eventually(lambda: annotated({"test.plexus.io/note": "from the agent"}), 10,
                         what="the control plane's annotation taken back")
        attrs.annotate("test.plexus.io/note", None)
        await eventually(lambda: annotated({}), 10, what="the agent's annotation taken back")


async def test_global_service_merges_backends_per_affinity(tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    async with apiserver("east", etcds["east"]), apiserver("west", etcds["west"]), \
            agent(tmp_path, etcds["east"]) as app:
        connect(tmp_path, "west", etcds["west"])
        # node n2: node n1 is the agent under test, which owns (and prunes) its own keys
        await register_pod(etcds["east"], "east", "n2", "e1", "10.1.1.20", {"app": "web"})
        await register_pod(etcds["west"], "west", "n1", "w1", "10.2.1.20", {"app": "web"})
        await register_pod(etcds["west"], "west", "n1", "w2", "10.2.1.21", {"app": "other"})
        for name, etcd in etcds.items():
            async with KvStore([etcd.endpoint]) as kv:
                await kv.put(f"plexus/manifests/v1/{name}/Service/default/web", service_manifest())
        gs = app.hive.require(GLOBAL_SERVICES)

        def both() -> Any:
            svc = gs.get(("default", "web"))
            return svc if svc and len(svc.backends) == 2 else None

        svc = await eventually(both, 10, what=lambda: f"backends from both clusters: {gs.all()} "
                               f"services={app.hive.require(SERVICES).all()}")
        assert {(b.ip, b.cluster) for b in svc.backends} == {("10.1.1.20", "east"), ("10.2.1.20", "west")}
        assert svc.frontends["10.96.1.10"]["http"].port == 80
        assert svc.backends[0].ports["http"].port == 8080

        async with KvStore([etcds["east"].endpoint]) as kv:
            await kv.put("plexus/manifests/v1/east/Service/default/web", service_manifest("local"))

        def local_only() -> bool:
            current = gs.get(("default", "web"))
            assert current is not None, "the global service is gone"
            return [b.cluster for b in current.backends] == ["east"]

        await eventually(local_only, 10, what="local affinity keeps local backends")


async def test_removing_the_config_file_drains(tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    async with apiserver("west", etcds["west"]), apiserver("east", etcds["east"]), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        path = connect(tmp_path, "west", etcds["west"])
        await register_node(etcds["west"], "west", "n1", "10.2.1.0/24", "172.31.2.11")
        await register_pod(etcds["west"], "west", "n1", "c1", "10.2.1.5", {"app": "db"})
        ipcache = app.hive.require(IPCACHE)
        await eventually(lambda: "10.2.1.5/32" in ipcache, 10)
        path.unlink()
        await eventually(lambda: "10.2.1.5/32" not in ipcache, 10, what="drained")
        assert "west" not in m.remotes
        assert not app.hive.require(IDENTITIES).where(lambda i: i.cluster == "west")


async def test_disconnect_keeps_state_and_resync_drops_what_vanished(
        tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    west = etcds["west"]
    async with apiserver("east", etcds["east"]), agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        ipcache = app.hive.require(IPCACHE)
        async with apiserver("west", west):
            connect(tmp_path, "west", west)
            await register_node(west, "west", "n1", "10.2.1.0/24", "172.31.2.11")
            await register_pod(west, "west", "n1", "c1", "10.2.1.5", {"app": "db"})
            await register_pod(west, "west", "n1", "c2", "10.2.1.6", {"app": "db"})
            await eventually(lambda: "10.2.1.6/32" in ipcache, 10)
        west.stop()
        await eventually(lambda: not m.remotes["west"].watcher.status.connected, 15,
                         what="west seen as disconnected")
        assert {"10.2.1.5/32", "10.2.1.6/32"} <= set(k for k, _ in ipcache.items())
        assert m.remotes["west"].watcher.status.failures >= 1
        # While the agent is away, a pod goes (written straight into the kvstore).
        west.start()
        connect(tmp_path, "west", "http://127.0.0.1:1")  # point the agent elsewhere
        await eventually(lambda: m.remotes["west"].watcher.kv.endpoints == ["http://127.0.0.1:1"],
                         10, what="agent switched to the unreachable endpoint")
        async with KvStore([west.endpoint]) as kv:
            await kv.delete(f"{IPCACHE_PREFIX}/10.2.1.6")
        assert "10.2.1.6/32" in ipcache  # still kept: not connected
        connect(tmp_path, "west", west)
        await eventually(lambda: "10.2.1.6/32" not in ipcache, 15, what="resync removed the vanished pod")
        assert "10.2.1.5/32" in ipcache


async def test_hostile_values_are_skipped_and_counted(tmp_path: Path, etcds: dict[str, Etcd]) -> None:
    west = etcds["west"]
    async with apiserver("east", etcds["east"]), apiserver("west", west), \
            agent(tmp_path, etcds["east"]) as app:
        m = mesh(app)
        await register_node(west, "west", "n9", "10.2.9.0/24", "172.31.2.19")
        async with KvStore([west.endpoint]) as kv:
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.1", "{not json")
            # an identity of east's range, and a key that does not match its value
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.2", json.dumps({"IP": "10.2.9.2", "ID": 65541}))
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.3", json.dumps({"IP": "10.2.9.99", "ID": 131077}))
            await kv.put(f"{NODES_PREFIX}/west/liar", Node("honest", "west", 2).to_json())
            await kv.put("cilium/state/identities/v1/id/131999", "no-colon-here;")
            await kv.put(f"{IPCACHE_PREFIX}/10.2.9.4", json.dumps({"IP": "10.2.9.4", "ID": 131077}))
        connect(tmp_path, "west", west)
        ipcache = app.hive.require(IPCACHE)
        await eventually(lambda: "10.2.9.4/32" in ipcache, 10, what="the good entry")
        st = m.remotes["west"].watcher.status
        assert st.invalid_entries == 5
        for bad in ("10.2.9.1/32", "10.2.9.2/32", "10.2.9.3/32", "10.2.9.99/32"):
            assert bad not in ipcache
        assert ("west", "liar") not in app.hive.require(NODES)
        assert st.connected


async def test_conflicting_and_malformed_configs_get_a_clear_status(tmp_path: Path,
                                                                   etcds: dict[str, Etcd]) -> None:
    with etcd_server("north") as north, etcd_server("twin") as twin, etcd_server("wide") as wide:
        async with KvStore([wide.endpoint]) as kv:  # a Cilium cluster set up for 511 clusters
            await kv.put("cilium/cluster-config/wide",
                         ClusterConfig(id=3, max_connected_clusters=511).to_json())
        async with KvStore([north.endpoint]) as kv:
            await kv.put("cilium/cluster-config/north", ClusterConfig(id=1).to_json())  # ours
        async with KvStore([twin.endpoint]) as kv:
            await kv.put("cilium/cluster-config/twin", ClusterConfig(id=2).to_json())  # west's
        async with apiserver("east", etcds["east"]), apiserver("west", etcds["west"]), \
                agent(tmp_path, etcds["east"]) as app:
            m = mesh(app)
            connect(tmp_path, "west", etcds["west"])
            await eventually(lambda: "west" in m.remotes and m.remotes["west"].watcher.status.ready, 10)
            # keys Cilium's etcd client config allows, and one nobody knows: accepted as
            # Cilium accepts them, so north connects and is refused for its id alone
            connect(tmp_path, "north", north).write_text(
                f"endpoints: ['{north.endpoint}']\ndial-timeout: 2000000000\n"
                "auto-sync-interval: 0\ninsecure-skip-tls-verify: false\ncolour: red\n")
            connect(tmp_path, "twin", twin)
            connect(tmp_path, "wide", wide)
            (tmp_path / "mesh" / "broken").write_text("endpoints: [oops\n")
            (tmp_path / "mesh" / "typo").write_text("endpoints: ['http://127.0.0.1:1']\ndial-timeout: 5s\n")
            (tmp_path / "mesh" / "Bad_Name").write_text(f"endpoints: ['{north.endpoint}']\n")

            def errors() -> dict[str, str]:
                return {n: s.get("configError", "") for n, s in m.remote_status().items()}

            await eventually(lambda: all(errors().get(n) for n in ("north", "twin", "wide", "broken",
                                                                   "typo", "Bad_Name")), 15,
                             what="errors")
            e = errors()
            assert "same as the local cluster" in e["north"]
            assert "already used by cluster west" in e["twin"]
            assert "invalid YAML" in e["broken"]
            assert "dial-timeout: Input should be a valid integer" in e["typo"]
            assert "maxConnectedClusters 511 and this cluster for 255" in e["wide"]
            assert "cluster name" in e["Bad_Name"]
            assert m.remotes["west"].watcher.status.ready  # the rest keeps working


async def test_identity_allocation_race_gives_one_id_per_label_set(etcd: Etcd) -> None:
    from clustermesh.identity import Allocator

    label_sets = [(f"k8s:app=a{i % 10}", "k8s:io.cilium.k8s.policy.cluster=east") for i in range(40)]
    async with KvStore([etcd.endpoint]) as kv1, KvStore([etcd.endpoint]) as kv2:
        a1, a2 = Allocator(kv1, 1), Allocator(kv2, 1)
        results = await asyncio.gather(*[a.allocate(ls) for ls in label_sets for a in (a1, a2)])
    by_labels: dict[tuple[str, ...], set[int]] = {}
    for ls, ident in zip([ls for ls in label_sets for _ in (0, 1)], results, strict=True):
        by_labels.setdefault(tuple(sorted(ls)), set()).add(ident)
    assert all(len(ids) == 1 for ids in by_labels.values())
    distinct = [next(iter(ids)) for ids in by_labels.values()]
    assert len(set(distinct)) == 10
    lo, hi = identity_range(1)
    assert all(lo <= i <= hi for i in distinct)
    # the index is Cilium's slave key (pkg/kvstore/allocator: value/<labels>/<owner>), one
    # per label set; nothing else under value/
    async with KvStore([etcd.endpoint]) as kv:
        values, _ = await kv.list_prefix("cilium/state/identities/v1/value/")
    assert sorted(v.key for v in values) == sorted(
        f"cilium/state/identities/v1/value/{format_labels(ls)}/clustermesh-apiserver"
        for ls in by_labels)
    assert {int(v.value) for v in values} == set(distinct)


async def test_an_identity_an_older_plexus_indexed_keeps_its_id(etcd: Etcd) -> None:
    from clustermesh.identity import Allocator, legacy_value_key, value_key

    labels = ("k8s:app=old", "k8s:io.cilium.k8s.policy.cluster=east")
    async with KvStore([etcd.endpoint]) as kv:
        await kv.put(f"cilium/state/identities/v1/id/{(1 << 16) + 300}", format_labels(labels))
        await kv.put(legacy_value_key(labels), str((1 << 16) + 300))
        assert await Allocator(kv, 1).allocate(labels) == (1 << 16) + 300
        assert await kv.get(legacy_value_key(labels)) is None
        got = await kv.get(value_key(labels))
        assert got is not None and got.value == str((1 << 16) + 300).encode()
        # an index whose identity is gone, or names other labels, is not trusted
        stale = ("k8s:app=stale", "k8s:io.cilium.k8s.policy.cluster=east")
        await kv.put(legacy_value_key(stale), str((1 << 16) + 300))
        assert await Allocator(kv, 1).allocate(stale) != (1 << 16) + 300


async def test_unused_identities_are_collected_after_the_grace(etcd: Etcd) -> None:
    from clustermesh.identity import Allocator, GarbageCollector

    async with KvStore([etcd.endpoint]) as kv:
        alloc = Allocator(kv, 1)
        used = await alloc.allocate(("k8s:app=a",))
        unused = await alloc.allocate(("k8s:app=b",))
        gc = GarbageCollector(alloc, grace=10)
        assert await gc.collect({used}, now=0) == []
        assert await gc.collect({used}, now=5) == []
        assert await gc.collect({used}, now=11) == [unused]
        assert set(await alloc.owned()) == {used}
        assert await alloc.allocate(("k8s:app=a",)) == used

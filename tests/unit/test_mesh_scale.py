"""What lets one agent follow many clusters: per-cluster counts kept exact as rows change,
and a relist or drain of one cluster that looks at no other cluster's rows."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermesh.kvstore import KV, Event, KvStore
from clustermesh.models import ClusterService, Identity, IPIdentity, L4Addr, Node, NodeAddress
from clustermesh.remote import ClusterWatcher, MeshTables
from clustermesh.tables import (
    BY_CLUSTER,
    identities_table,
    ipcache_table,
    nodes_table,
    services_table,
)
from plexus.core.manifests import manifests_table
from plexus.core.tables import Table

CLUSTERS = ("north", "south", "west")

# One operation on a table of (name, cluster) rows keyed by name: upsert, delete, a resync
# of one cluster, a drain of one cluster.
ops = st.lists(st.one_of(
    st.tuples(st.just("upsert"), st.integers(0, 9), st.sampled_from(CLUSTERS)),
    st.tuples(st.just("delete"), st.integers(0, 9), st.just("")),
    st.tuples(st.just("replace"), st.frozensets(st.integers(0, 9)), st.sampled_from(CLUSTERS)),
    st.tuples(st.just("drain"), st.just(0), st.sampled_from(CLUSTERS)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_counts_by_index_stay_equal_to_a_scan_through_every_change(steps: list[Any]) -> None:
    t: Table[int, tuple[int, str]] = Table("t", key=lambda r: r[0], indexes={BY_CLUSTER: lambda r: r[1]})
    for op, arg, cluster in steps:
        if op == "upsert":
            t.upsert((arg, cluster))
        elif op == "delete":
            t.delete(arg)
        elif op == "replace":
            t.replace_in(BY_CLUSTER, cluster, [(n, cluster) for n in arg])
            assert {r[0] for r in t.by(BY_CLUSTER, cluster)} == set(arg)
        else:
            t.delete_in(BY_CLUSTER, cluster)
            assert t.count(BY_CLUSTER, cluster) == 0
        for c in CLUSTERS:
            scanned = sorted(t.where(lambda r, c=c: r[1] == c))  # type: ignore[misc]
            assert t.count(BY_CLUSTER, c) == len(scanned)
            assert sorted(t.by(BY_CLUSTER, c)) == scanned
        assert sorted(map(str, t.index_values(BY_CLUSTER))) == sorted({r[1] for r in t.all()})


def test_an_unknown_index_is_named_in_the_error() -> None:
    t: Table[int, int] = Table("numbers", key=lambda r: r)
    with pytest.raises(KeyError, match="table numbers has no index 'cluster'"):
        t.count("cluster", "west")


CLUSTER_IDS = {"north": 3, "south": 4, "west": 2}


def _node(cluster: str, i: int) -> Node:
    cid = CLUSTER_IDS[cluster]
    return Node(f"n{i}", cluster, cid, (NodeAddress("InternalIP", f"172.31.{cid}.{i + 1}"),),
                f"10.{cid}.{i}.0/24")


def _items(cluster: str, nodes: int, ips: int, version: int = 0) -> dict[str, list[KV]]:
    """What one cluster's etcd lists, per watched prefix of its watcher."""
    cid = CLUSTER_IDS[cluster]
    ident = (cid << 16) + 300
    n = [_node(cluster, i) for i in range(nodes)]
    e = [IPIdentity(f"10.{cid}.{i // 250}.{i % 250 + 1}", ident, host_ip=f"172.31.{cid}.1", cluster=cluster,
                    pod_name=f"p{i}-{version}") for i in range(ips)]
    s = ClusterService(cluster, "default", "web", {"10.96.0.1": {"http": L4Addr("TCP", 80)}},
                       {f"10.{cid}.0.1": {"http": L4Addr("TCP", 8080)}}, cluster_id=cid, shared=True)
    return {
        "nodes": [KV(x.kv_key, x.to_json().encode(), 1) for x in n],
        "ip": [KV(x.kv_key, x.to_json().encode(), 1) for x in e],
        "identities": [KV(f"cilium/state/identities/v1/id/{ident}",
                          b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=" + cluster.encode() + b";", 1)],
        "services": [KV(s.kv_key, s.to_json().encode(), 1)],
    }


class _Mesh:
    def __init__(self) -> None:
        self.tables = MeshTables(nodes_table(), ipcache_table(), identities_table(), services_table(),
                                 manifests_table())
        self.watchers = {c: self._watcher(c) for c in CLUSTERS}

    def _watcher(self, name: str) -> ClusterWatcher:
        w = ClusterWatcher(name, cast(KvStore, None), self.tables, local_cluster="east", local_id=1,
                           ids_in_use=lambda _n: {})
        w.status.cluster_id = CLUSTER_IDS[name]
        return w

    def relist(self, cluster: str, items: dict[str, list[KV]]) -> None:
        w = self.watchers[cluster]
        for p in w.prefixes:
            kind = next((k for k in items if f"/{k}/" in p.prefix or p.prefix.endswith(f"/{k}/v1/")),
                        None)
            w._relist(p, tuple(items[kind]) if kind else ())

    def counts(self, cluster: str) -> dict[str, int]:
        d = self.watchers[cluster].status.as_dict(self.tables)
        return {k: d[k] for k in ("nodes", "identities", "services")} | {
            "claims": self.tables.ip_claims.count(BY_CLUSTER, cluster)}

    def scanned(self, cluster: str) -> dict[str, int]:
        t = self.tables

        def n(table: Table[Any, Any]) -> int:
            return sum(1 for r in table.all() if r.cluster == cluster)
        return {"nodes": n(t.nodes), "identities": n(t.identities), "services": n(t.services),
                "claims": n(t.ip_claims)}


def _forbid_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    def scan(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a whole-table scan")
    for name in ("where", "all", "items", "__iter__", "delete_where", "replace_where"):
        monkeypatch.setattr(Table, name, scan)


def test_a_relist_or_drain_of_one_cluster_touches_no_other_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _Mesh()
    for c in CLUSTERS:
        m.relist(c, _items(c, nodes=5, ips=20))
    before = {c: m.scanned(c) for c in CLUSTERS}
    assert before["west"] == {"nodes": 5, "identities": 1, "services": 1, "claims": 20}
    changed: set[Any] = set()
    for t in (m.tables.nodes, m.tables.ip_claims, m.tables.identities, m.tables.services):
        t._changed = lambda key, t=t: changed.add((t.name, key))  # type: ignore[method-assign,misc]
    with monkeypatch.context() as patched:
        _forbid_scans(patched)
        m.relist("west", _items("west", nodes=3, ips=25, version=1))  # 2 nodes gone, every ip new
        counts = {c: m.counts(c) for c in CLUSTERS}
    assert changed and all("west" in str(key) for _, key in changed), changed
    assert counts["west"] == {"nodes": 3, "identities": 1, "services": 1, "claims": 25}
    for c in ("north", "south"):
        assert counts[c] == m.scanned(c) == before[c]
    with monkeypatch.context() as patched:
        _forbid_scans(patched)
        gone = m.watchers["north"].drain()
        counts = {c: m.counts(c) for c in CLUSTERS}
    assert gone == 5 + 20 + 1 + 1
    assert counts["north"] == {"nodes": 0, "identities": 0, "services": 0, "claims": 0}
    assert counts["south"] == before["south"] and counts["west"] == m.scanned("west")


def test_counts_follow_watch_events_put_update_delete() -> None:
    m = _Mesh()
    m.relist("west", _items("west", nodes=2, ips=3))
    w = m.watchers["west"]
    nodes = next(p for p in w.prefixes if p.table is m.tables.nodes)
    claims = next(p for p in w.prefixes if p.table is m.tables.ip_claims)
    extra = _node("west", 7)
    changed = _node("west", 0)
    w._apply(nodes, (Event("put", extra.kv_key, extra.to_json().encode(), 2),
                     Event("put", changed.kv_key, changed.to_json().encode(), 3),
                     Event("delete", _node("west", 1).kv_key, b"", 4)))
    ip = IPIdentity("10.2.0.1", (2 << 16) + 301, cluster="west")
    w._apply(claims, (Event("put", ip.kv_key, ip.to_json().encode(), 5),  # an update
                      Event("delete", "cilium/state/ip/v1/default/10.2.0.2", b"", 6),
                      Event("put", "cilium/state/ip/v1/default/10.2.0.99", b"not json", 7)))
    assert m.counts("west") == m.scanned("west") == {"nodes": 2, "identities": 1, "services": 1,
                                                     "claims": 2}
    assert w.status.invalid_entries == 1
    assert m.tables.identities.count(BY_CLUSTER, "west") == 1
    assert isinstance(m.tables.identities.by(BY_CLUSTER, "west")[0], Identity)


async def test_a_big_list_decoded_in_slices_gives_the_same_rows() -> None:
    import asyncio

    from clustermesh.remote import RELIST_SLICE
    m = _Mesh()
    turns = asyncio.Semaphore(1)
    w = m.watchers["west"]
    w.turns = turns
    items = _items("west", nodes=5, ips=RELIST_SLICE * 2 + 7)
    claims = next(p for p in w.prefixes if p.table is m.tables.ip_claims)
    m.relist("north", _items("north", nodes=1, ips=3))
    await asyncio.gather(w._on_relist(claims, tuple(items["ip"])),
                         w._on_relist(claims, tuple(items["ip"][:RELIST_SLICE + 1])))
    # the second list, applied last, is what the table holds; north's rows are untouched
    assert m.tables.ip_claims.count(BY_CLUSTER, "west") == RELIST_SLICE + 1 == len(claims.keys)
    assert m.tables.ip_claims.count(BY_CLUSTER, "north") == 3


def test_a_cluster_becoming_ready_is_told_once_per_time() -> None:
    m = _Mesh()
    w = m.watchers["west"]
    told: list[bool] = []
    w.on_ready = lambda: told.append(w.status.ready)
    w._canaries_seen = True
    for p in w.prefixes[:-1]:
        w._listed.add(p.prefix)
        w._update_ready()
    assert told == [] and not w.status.ready
    w._listed.add(w.prefixes[-1].prefix)
    w._update_ready()
    w._update_ready()
    assert told == [True]  # ready already when told
    w._canaries_seen = False
    w._update_ready()
    w._canaries_seen = True
    w._update_ready()
    assert told == [True, True]


def test_what_a_synced_mesh_built_is_frozen_out_of_full_collections() -> None:
    import gc

    from plexus.core.memory import freeze_built_state
    m = _Mesh()
    m.relist("west", _items("west", nodes=50, ips=500))
    rows = {id(r) for r in m.tables.ip_claims.by(BY_CLUSTER, "west")}
    assert len(rows) == 500 and rows <= {id(o) for o in gc.get_objects()}  # what a collection visits
    before = gc.get_freeze_count()
    try:
        freeze_built_state()
        assert gc.get_freeze_count() >= before + 500
        assert not rows & {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()

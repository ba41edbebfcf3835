"""What the datapath's maps hold, derived from the merged tables: both families in the
ipcache, and incremental derivation equal to deriving everything again."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bpf.ipcache import FLAG_REMOTE_CLUSTER, IpcacheEntry, ipcache_rows
from bpf.module import BpfDatapath
from bpf.policy import CIDR_IDENTITY_BASE
from clustermesh.models import ID_HOST, ID_REMOTE_NODE, Identity, IPIdentity, Node, NodeAddress
from plexus.core.manifests import Manifest
from plexus.core.node import Endpoint, LocalNode
from tests.bpf_fixture import bpf_module

LOCAL = LocalNode(cluster="east", cluster_id=1, name="n1", ip="172.31.1.11", pod_cidr="10.1.1.0/24",
                  pod_cidr_v6="fd00:1:1::/64")


def test_ipcache_rows_hold_both_families() -> None:
    nodes = [Node("n1", "east", 1, (NodeAddress("InternalIP", "172.31.1.11"),
                                    NodeAddress("InternalIP", "fd00:31:1::11"))),
             Node("n1", "west", 2, (NodeAddress("InternalIP", "172.31.2.11"),
                                    NodeAddress("InternalIP", "fd00:31:2::11")))]
    endpoints = [
        IPIdentity("10.1.1.5", 65800, host_ip="172.31.1.11", cluster="east"),
        IPIdentity("fd00:1:1::5", 65800, host_ip="172.31.1.11", cluster="east"),
        IPIdentity("fd00:2:1:0:0:0:0:7", 131400, host_ip="fd00:31:2::11", cluster="west"),
        IPIdentity("fd00:2:9::", 131401, host_ip="172.31.2.11", prefix_len=48, cluster="west"),
    ]
    cidrs = {"198.51.100.0/24": CIDR_IDENTITY_BASE, "2001:db8::/32": CIDR_IDENTITY_BASE + 1}
    rows = ipcache_rows(LOCAL, nodes, cidrs, endpoints)
    assert rows == {r.prefix: r for r in [
        IpcacheEntry("172.31.1.11/32", ID_HOST, "172.31.1.11", 0),
        IpcacheEntry("fd00:31:1::11/128", ID_HOST, "fd00:31:1::11", 0),
        IpcacheEntry("172.31.2.11/32", ID_REMOTE_NODE, "172.31.2.11", 0),
        IpcacheEntry("fd00:31:2::11/128", ID_REMOTE_NODE, "fd00:31:2::11", 0),
        IpcacheEntry("10.1.1.5/32", 65800, "172.31.1.11", 0),
        IpcacheEntry("fd00:1:1::5/128", 65800, "172.31.1.11", 0),
        IpcacheEntry("fd00:2:1::7/128", 131400, "fd00:31:2::11", FLAG_REMOTE_CLUSTER),
        IpcacheEntry("fd00:2:9::/48", 131401, "172.31.2.11", FLAG_REMOTE_CLUSTER),
        IpcacheEntry("198.51.100.0/24", CIDR_IDENTITY_BASE, "", 0),
        IpcacheEntry("2001:db8::/32", CIDR_IDENTITY_BASE + 1, "", 0),
    ]}


def test_an_endpoint_entry_beats_a_cidr_a_node_and_the_local_ip() -> None:
    nodes = [Node("n2", "east", 1, (NodeAddress("InternalIP", "fd00:31:1::12"),))]
    endpoints = [IPIdentity("fd00:31:1::12", 70000, cluster="east"),
                 IPIdentity("172.31.1.11", 70001, cluster="east")]
    rows = ipcache_rows(LOCAL, nodes, {"fd00:31:1::12/128": CIDR_IDENTITY_BASE}, endpoints)
    assert rows["fd00:31:1::12/128"].identity == 70000
    assert rows["172.31.1.11/32"].identity == 70001
    assert ipcache_rows(LOCAL, nodes, {"fd00:31:1::12/128": CIDR_IDENTITY_BASE}, [])[
        "fd00:31:1::12/128"].identity == CIDR_IDENTITY_BASE
    assert ipcache_rows(LOCAL, nodes, {}, [])["fd00:31:1::12/128"].identity == ID_REMOTE_NODE


# ---- the module: apply(changed keys) == recompute() ---------------------------------------

CIDRS = ["198.51.100.0/24", "fd00:db8::/64", "10.9.0.0/16"]


def policy_manifest(rng: random.Random, name: str) -> Manifest:
    app = rng.choice("abc")
    body: dict[str, Any] = {
        "apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": rng.choice("abc")}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": app}}],
                              "toPorts": [{"ports": [{"port": rng.choice([80, 443]), "protocol": "TCP"}]}]},
                             {"fromCIDR": rng.sample(CIDRS, 2)}]}}
    if rng.random() < 0.1:
        body["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = 99999  # rejected: last good stays
    return Manifest(rng.choice(["east", "west"]), "PlexusNetworkPolicy", "default", name, body)


def snapshot(m: BpfDatapath) -> tuple[Any, ...]:
    """The module's derived tables, CIDR identities named by their CIDR: a recompute numbers
    them afresh, the incremental path keeps the numbers it gave."""
    cidr = {v: k for k, v in m.resolver.cidrs.ids.items()}

    def ident(i: int) -> Any:
        return cidr.get(i, i)

    return (sorted((r.prefix, ident(r.identity), r.host_ip, r.flags) for r in m.ipcache),
            sorted((e.ifname, str(ident(e.identity)), e.port, e.proto, e.direction, e.action)
                   for e in m.entries),
            sorted(e.key for e in m.enforced), sorted(a.ifname for a in m.attachments))


def test_incremental_derivation_equals_recompute(tmp_path: Path) -> None:
    rng = random.Random(7)
    inc, ti = bpf_module(tmp_path / "a", LOCAL)
    ref, tr = bpf_module(tmp_path / "b", LOCAL)
    inc.recompute()
    for _ in range(400):
        kind = rng.choice(["endpoints", "ipcache", "identities", "identities", "manifests", "nodes"])
        if kind == "endpoints":
            i = rng.randint(0, 4)
            row: Any = Endpoint(f"c{i}", f"10.1.1.{i + 2}", "default", f"p{i}", {"app": rng.choice("abc")},
                                f"plx{rng.randint(0, 5)}", ipv6=f"fd00:1:1::{i + 2}")
            key: Any = row.key
        elif kind == "ipcache":
            v6 = rng.random() < 0.5
            ip = f"fd00:2:1::{rng.randint(1, 20):x}" if v6 else f"10.2.1.{rng.randint(1, 20)}"
            if rng.random() < 0.1:
                ip = rng.choice(["172.31.2.11", "fd00:31:2::11", "172.31.1.11"])  # shadows a node
            row = IPIdentity(ip, 131072 + rng.randint(256, 300), host_ip="172.31.2.11",
                             cluster=rng.choice(["east", "west"]))
            key = row.prefix
        elif kind == "identities":
            ident = 131072 + rng.randint(256, 300)
            row = Identity(ident, (f"k8s:app={rng.choice('abc')}", "k8s:io.cilium.k8s.policy.cluster=west",
                                   "k8s:io.kubernetes.pod.namespace=default"), cluster="west")
            key = ident
        elif kind == "manifests":
            row = policy_manifest(rng, f"pol{rng.randint(0, 3)}")
            key = row.key
        else:
            n = rng.randint(1, 3)
            ips = rng.sample([f"172.31.2.1{n}", f"fd00:31:2::1{n}", "172.31.2.11"], rng.randint(0, 2))
            addrs = tuple(NodeAddress("InternalIP", a) for a in ips)
            row = Node(f"n{n}", "west", 2, addrs)
            key = row.key
        delete = rng.random() < 0.3 and ti[kind].get(key) is not None
        for t in (ti, tr):
            if delete:
                t[kind].delete(key)
            else:
                t[kind].upsert(row)
        inc.apply({ti[kind].name: {key}})
        ref.recompute()
        assert snapshot(inc) == snapshot(ref)
    assert len(inc.entries) > 5 and any(":" in r.prefix for r in inc.ipcache)


def test_unknown_source_falls_back_to_recompute(tmp_path: Path) -> None:
    m, t = bpf_module(tmp_path, LOCAL)
    m.recompute()
    t["ipcache"].upsert(IPIdentity("fd00:2:1::9", 131400, cluster="west"))
    m.apply({"something-new": {"x"}})  # a table this module does not derive incrementally
    assert m.ipcache.get("fd00:2:1::9/128") is not None

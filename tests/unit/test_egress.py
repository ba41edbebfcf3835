"""Egress gateway: manifest validation, selection across clusters, entries, tie-breaks,
failover with hold-down, and the module's view (pure: tables in, tables out)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpf.flows import EGRESS_POLICY_OF
from clustermesh.models import Identity, IPIdentity, Node, NodeAddress
from clustermesh.tables import IDENTITIES, IPCACHE, NODES, identities_table, ipcache_table, nodes_table
from egress.config import EgressConfig
from egress.failover import GatewayChooser, healthy
from egress.models import EgressGatewayPolicy
from egress.module import EgressGateways
from egress.ops import interface_addresses
from egress.tables import (
    ANNOTATION_CONTROL_PLANE,
    ANNOTATION_INTERFACES,
    ANNOTATION_PROBES,
    ANNOTATION_UNAVAILABLE,
    CONTROL_PLANE,
    MAX_REPORTED,
    GatewayHealth,
    MeshEndpoint,
    MeshIndex,
    PolicyState,
    entries,
    format_interfaces,
    format_verdicts,
    group_endpoints,
    mesh_endpoints,
    parse_interfaces,
    parse_verdicts,
    resolve_policy,
    selected,
    selects,
)
from plexus.apply import load_documents
from plexus.core.clock import ManualClock
from plexus.core.config import ConfigError, parse
from plexus.core.manifests import MANIFESTS, Manifest, manifests_table
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES, LocalNode, NodeAttributes
from tests.support import eventually

POLICY = """
apiVersion: plexus.io/v1
kind: EgressGatewayPolicy
metadata: {name: legacy-db}
spec:
  selectors:
  - podSelector: {matchLabels: {app: billing}}
    namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
  destinationCIDRs: [198.51.100.0/24]
  excludedCIDRs: [198.51.100.128/25]
  egressIP: 10.255.0.10
  egressGateways:
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: east}}
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: west}}
"""
E_N1, E_N2, W_N1, W_N2 = ("east", "n1"), ("east", "n2"), ("west", "n1"), ("west", "n2")


def body(text: str = POLICY, **spec: Any) -> dict[str, Any]:
    b: dict[str, Any] = yaml.safe_load(text)
    b["spec"].update(spec)
    return b


def policy(**spec: Any) -> EgressGatewayPolicy:
    return parse(EgressGatewayPolicy, body(**spec), "test")


def node(cluster: str, name: str) -> Node:
    cid = 1 if cluster == "east" else 2
    idx = int(name[1:])
    return Node(name=name, cluster=cluster, cluster_id=cid,
                addresses=(NodeAddress("InternalIP", f"172.31.{cid}.{10 + idx}"),),
                ipv4_alloc_cidr=f"10.{cid}.{idx}.0/24")


NODES_ALL = [node(c, n) for c in ("east", "west") for n in ("n1", "n2")]


def identity(ident: int, app: str, cluster: str, namespace: str) -> Identity:
    return Identity(ident, (f"k8s:app={app}",
                            f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}",
                            f"k8s:io.cilium.k8s.policy.cluster={cluster}",
                            f"k8s:io.kubernetes.pod.namespace={namespace}"), cluster)


def pod(ip: str, ident: int, host: str, namespace: str, name: str, cluster: str) -> IPIdentity:
    return IPIdentity(ip, ident, host_ip=host, namespace=namespace, pod_name=name, cluster=cluster)


IDS = {i.id: i for i in (identity(65537, "billing", "east", "default"),
                         identity(131073, "billing", "west", "default"),
                         identity(65538, "web", "east", "default"),
                         identity(65539, "billing", "east", "shop"))}
IPCACHE_ALL = [
    pod("10.1.1.5", 65537, "172.31.1.11", "default", "bill-e", "east"),
    pod("10.2.1.5", 131073, "172.31.2.11", "default", "bill-w", "west"),
    pod("10.1.1.6", 65538, "172.31.1.11", "default", "web", "east"),
    pod("10.1.2.7", 65539, "172.31.1.12", "shop", "bill-shop", "east"),
    IPIdentity("172.31.1.11", 1, cluster="east"),                       # a host: never selected
    IPIdentity("203.0.113.0", 16777217, prefix_len=24, cluster="east"),  # a CIDR: never selected
]


def gw(cluster: str, name: str, **extra: str) -> dict[str, Any]:
    return {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": name,
                                             "io.cilium.k8s.policy.cluster": cluster}}, **extra}


def endpoints() -> list[MeshEndpoint]:
    return mesh_endpoints(IPCACHE_ALL, IDS, NODES_ALL)


def state(name: str = "legacy-db", created: float = 0.0, **spec: Any) -> PolicyState:
    return resolve_policy(("east", "default", name), created, policy(**spec), endpoints(), NODES_ALL)


# ---- validation -------------------------------------------------------------------------------

def problems_of(tmp_path: Path, spec: dict[str, Any]) -> str:
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(body(**spec)))
    with pytest.raises(ConfigError) as e:
        load_documents([f])
    return str(e.value)


def test_a_good_policy_validates_through_apply(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    [doc] = load_documents([f])
    assert (doc.kind, doc.namespace, doc.name) == ("EgressGatewayPolicy", "default", "legacy-db")
    assert doc.body["spec"]["egressIP"] == "10.255.0.10"
    assert doc.body["spec"]["destinationCIDRs"] == ["198.51.100.0/24"]


def test_the_example_validates() -> None:
    [doc] = load_documents([Path(__file__).resolve().parents[2] / "examples" / "egress-gateway.yaml"])
    assert parse(EgressGatewayPolicy, doc.body, "example") == policy()


def test_overlapping_destination_and_excluded_cidrs_are_allowed() -> None:
    p = policy(excludedCIDRs=["198.51.100.0/24", "198.51.100.0/25"])
    assert [str(c) for c in p.spec.excluded_cidrs] == ["198.51.100.0/24", "198.51.100.0/25"]


@pytest.mark.parametrize(("spec", "expected"), [
    ({"destinationCIDRs": ["198.51.100.1/24"]}, "spec.destinationCIDRs[0]"),
    ({"destinationCIDRs": []}, "spec.destinationCIDRs: List should have at least 1 item"),
    ({"excludedCIDRs": ["nonsense"]}, "spec.excludedCIDRs[0]"),
    ({"egressIP": "224.0.0.5"}, "spec.egressIP: Value error, 224.0.0.5 is a multicast address"),
    ({"egressIP": "0.0.0.0"}, "spec.egressIP: Value error, 0.0.0.0 is unspecified"),
    ({"egressIP": "198.51.100.9"}, "egressIP: 198.51.100.9 lies inside destinationCIDRs[0]"),
    ({"egressIP": "2001:db8::1"}, "egressIP: IPv6 address 2001:db8::1 cannot be the source"),
    ({"destinationCIDRs": ["198.51.100.0/24", "2001:db8::/64"]},
     "destinationCIDRs[1]: 2001:db8::/64 is IPv6; the egress gateway steers IPv4 only"),
    ({"excludedCIDRs": ["2001:db8::/64"]},
     "excludedCIDRs[0]: 2001:db8::/64 is IPv6; the egress gateway steers IPv4 only"),
    ({"egressGateways": []}, "spec.egressGateways: List should have at least 1 item"),
    ({"selectors": [{}]}, "spec.selectors[0]: Value error, give a podSelector or a namespaceSelector"),
    ({"selectors": [{"podSelector": {"matchLabelz": {}}}]},
     "spec.selectors[0].podSelector.matchLabelz: unknown field"),
    ({"egressGateways": [{"nodeSelector": {}, "egressIP": "127.0.0.1"}]},
     "spec.egressGateways[0].egressIP: Value error, 127.0.0.1 is a loopback address"),
    ({"egressGateways": [{"nodeSelector": {}, "interface": "eth0/1"}]},
     "spec.egressGateways[0]: Value error, interface 'eth0/1' is not a Linux interface name"),
    ({"egressGateways": [{"nodeSelector": {}, "interface": "eth0", "egressIP": "192.0.2.1"}]},
     "spec.egressGateways[0]: Value error, give egressIP or interface, not both"),
    ({"egressGateways": [{"nodeSelector": {}}, {"nodeSelector": {}, "egressIP": "192.0.2.1"}]},
     "egressGateways[1].egressIP: the policy's egressIP 10.255.0.10 is held by whichever gateway"),
    ({"egressIP": None, "egressGateways": [{"nodeSelector": {}, "egressIP": "2001:db8::5"}]},
     "egressGateways[0].egressIP: IPv6 address 2001:db8::5 cannot be the source"),
])
def test_validation_errors_name_the_field(tmp_path: Path, spec: dict[str, Any], expected: str) -> None:
    msg = problems_of(tmp_path, spec)
    assert "EgressGatewayPolicy default/legacy-db" in msg
    assert expected in msg, msg


# ---- selection ----------------------------------------------------------------------------------

def test_selection_spans_clusters_and_the_cluster_label_narrows() -> None:
    s = state()
    assert [(e.ip, e.cluster, e.node) for e in s.endpoints] == [
        ("10.1.1.5", "east", E_N1), ("10.2.1.5", "west", W_N1)]  # not web, not namespace shop
    west = state(selectors=[{"podSelector": {"matchLabels": {
        "app": "billing", "io.cilium.k8s.policy.cluster": "west"}}}])
    assert [e.ip for e in west.endpoints] == ["10.2.1.5"]
    any_ns = state(selectors=[{"podSelector": {"matchLabels": {"app": "billing"}}}])
    assert [e.ip for e in any_ns.endpoints] == ["10.1.1.5", "10.1.2.7", "10.2.1.5"]
    by_ns = state(selectors=[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}])
    assert [e.ip for e in by_ns.endpoints] == ["10.1.2.7"]


def test_gateways_in_preference_order_across_clusters() -> None:
    s = state(egressGateways=[
        gw("west", "n2"),
        {"nodeSelector": {}},  # every node; west/n2 keeps its first place
    ])
    assert [g.node for g in s.gateways] == [W_N2, E_N1, E_N2, W_N1]
    assert {g.egress_ip for g in s.gateways} == {"10.255.0.10"}


def test_without_an_egress_ip_the_gateway_uses_its_own_or_its_interface() -> None:
    s = state(egressIP=None, egressGateways=[
        gw("east", "n2"), gw("west", "n1", interface="ext0")])
    assert [(g.node, g.egress_ip, g.interface) for g in s.gateways] == [
        (E_N2, "172.31.1.12", None), (W_N1, None, "ext0")]


def test_an_egress_ip_a_gateway_cannot_hold_is_reported_on_that_gateway() -> None:
    s = state(egressIP=None, egressGateways=[
        gw("east", "n2", egressIP="172.31.1.11"),   # east/n1's own address
        gw("west", "n1", egressIP="10.2.2.99"),     # inside west/n2's pod CIDR
        {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "n9"}}}])
    assert s.gateways == ()
    assert s.problems == (
        "spec.egressGateways[0].egressIP: 172.31.1.11 is an address of node east/n1, so gateway "
        "east/n2 cannot hold it",
        "spec.egressGateways[1].egressIP: 10.2.2.99 lies in the pod CIDR 10.2.2.0/24 of node "
        "west/n2, so gateway west/n1 cannot hold it",
        "spec.egressGateways[2].nodeSelector: selects no node")
    floating = state(egressIP="10.1.2.1")
    assert floating.problems == ("spec.egressIP: 10.1.2.1 lies in the pod CIDR 10.1.2.0/24 of node "
                                 "east/n2; it cannot follow the active gateway",)


# ---- entries -------------------------------------------------------------------------------------

def choose(states: list[PolicyState], health: dict[Any, GatewayHealth] | None = None,
           clock: ManualClock | None = None) -> Any:
    chooser = GatewayChooser(clock or ManualClock(), hold_down=5.0)
    return chooser.choose(states, health or {})


def test_entries_steer_destinations_and_excluded_cidrs_win() -> None:
    s = state()
    d = entries([s], choose([s]))
    got = {(e.source_ip, e.destination): (e.excluded, e.gateway, e.egress_ip) for e in d.entries}
    assert got == {
        ("10.1.1.5", "198.51.100.0/24"): (False, E_N2, "10.255.0.10"),
        ("10.1.1.5", "198.51.100.128/25"): (True, None, None),
        ("10.2.1.5", "198.51.100.0/24"): (False, E_N2, "10.255.0.10"),
        ("10.2.1.5", "198.51.100.128/25"): (True, None, None),
    }
    assert d.conflicts == {}
    # A pod's IPv6 address pairs only with IPv6 destinations.
    v6 = MeshEndpoint("fd00:1::5", "east", "default", "bill6", {}, {}, E_N1)
    dual = replace(state(egressIP=None), endpoints=(v6, endpoints()[0]),
                   destinations=("198.51.100.0/24", "2001:db8:100::/48"))
    assert [(e.source_ip, e.destination) for e in entries([dual], choose([dual])).entries] == [
        ("10.1.1.5", "198.51.100.0/24"), ("10.1.1.5", "198.51.100.128/25"),
        ("fd00:1::5", "2001:db8:100::/48")]  # neither the IPv4 destination nor exclusion
    # A policy excluding its own destination: nothing of it is steered.
    same = state(excludedCIDRs=["198.51.100.0/24"])
    assert all(e.excluded for e in entries([same], choose([same])).entries)


def test_same_destination_the_older_policy_wins_and_the_younger_is_told() -> None:
    old = state("a-old", created=10.0)
    young = state("b-young", created=20.0, egressIP="10.255.0.20")
    for order in ([old, young], [young, old]):
        d = entries(order, choose(order))
        e = next(x for x in d.entries if x.key == ("10.1.1.5", "198.51.100.0/24"))
        assert (e.policy[2], e.egress_ip) == ("a-old", "10.255.0.10")
        assert d.conflicts[young.key] == [
            "198.51.100.0/24: the older policy east/default/a-old wins (from 10.1.1.5, 10.2.1.5)"]
        assert old.key not in d.conflicts
    # Created in the same second: the key decides, the same on every agent.
    tie = [state("zz", created=1.0, egressIP="10.255.0.20"), state("aa", created=1.0)]
    e = next(x for x in entries(tie, choose(tie)).entries if x.key == ("10.1.1.5", "198.51.100.0/24"))
    assert e.policy[2] == "aa"


def test_the_more_specific_destination_wins_and_an_exclusion_beats_another_policy() -> None:
    wide = state("wide", created=1.0, excludedCIDRs=[])
    narrow = state("narrow", created=2.0, destinationCIDRs=["198.51.100.0/25"], egressIP="10.255.0.20",
                   excludedCIDRs=["198.51.100.0/24"])
    d = entries([wide, narrow], choose([wide, narrow]))
    got = {e.key: (e.policy[2], e.excluded) for e in d.entries if e.source_ip == "10.1.1.5"}
    # narrow's exclusion of the /24 beats wide's older /24; its own /25 stays (LPM picks it).
    assert got == {("10.1.1.5", "198.51.100.0/24"): ("narrow", True),
                   ("10.1.1.5", "198.51.100.0/25"): ("narrow", False)}
    assert d.conflicts[wide.key] == [
        "198.51.100.0/24: excluded by east/default/narrow, which wins (from 10.1.1.5, 10.2.1.5)"]
    plain = state("narrow", created=2.0, destinationCIDRs=["198.51.100.0/25"], excludedCIDRs=[])
    d = entries([wide, plain], choose([wide, plain]))
    assert d.conflicts[wide.key] == [
        "198.51.100.0/25: the more specific destination of east/default/narrow wins within "
        "198.51.100.0/24 (from 10.1.1.5, 10.2.1.5)"]
    # Many endpoints: a few are named, the rest counted.
    crowd = tuple(replace(endpoints()[0], ip=f"10.1.1.{i}") for i in range(10, 15))
    d = entries([replace(wide, endpoints=crowd), replace(plain, endpoints=crowd)], {})
    assert d.conflicts[wide.key] == [
        "198.51.100.0/25: the more specific destination of east/default/narrow wins within "
        "198.51.100.0/24 (from 10.1.1.10, 10.1.1.11, 10.1.1.12 and 2 more)"]


# ---- failover ------------------------------------------------------------------------------------

def down(reporter: str, gw: tuple[str, str]) -> GatewayHealth:
    return GatewayHealth(reporter, gw, healthy=False, reason="probe timeout")


def test_first_healthy_gateway_with_hold_down_before_the_preferred_returns() -> None:
    clock = ManualClock()
    chooser = GatewayChooser(clock, hold_down=5.0)
    s = state()
    key = (s.key, E_N1)

    def active(health: list[GatewayHealth]) -> Any:
        act = chooser.choose([s], {h.key: h for h in health})[key].gateway
        return act.node if act else None

    assert active([]) == E_N2
    assert active([down("east/n1", E_N2)]) == W_N2          # this source's prober says down
    assert chooser.failovers == {key: 1}
    # The other source node did not see it down: it stays on the preferred gateway.
    assert chooser.active[(s.key, W_N1)].gateway.node == E_N2  # type: ignore[union-attr]
    assert active([]) == W_N2                                 # recovered: hold-down starts
    assert chooser.next_deadline() == clock.now() + 5.0
    clock.advance(4.9)
    assert active([]) == W_N2
    clock.advance(0.1)
    assert active([]) == E_N2                                 # hold-down over: back
    assert chooser.next_deadline() is None
    # Flapping inside the hold-down never drags traffic back.
    assert active([down(CONTROL_PLANE, E_N2)]) == W_N2        # the control plane speaks for all
    assert chooser.active[(s.key, W_N1)].gateway.node == W_N2  # type: ignore[union-attr]
    for _ in range(3):
        clock.advance(2.0)
        assert active([]) == W_N2
        assert active([down("east/n1", E_N2)]) == W_N2
    # Every gateway down: no gateway (the datapath drops, never leaks).
    assert active([down(CONTROL_PLANE, E_N2), down(CONTROL_PLANE, W_N2)]) is None
    # The first to come back takes over at once: nothing is better than nothing.
    assert active([down(CONTROL_PLANE, W_N2)]) == E_N2


def test_no_healthy_gateway_gives_entries_that_drop() -> None:
    s = state()
    act = choose([s], {h.key: h for h in (down(CONTROL_PLANE, E_N2), down(CONTROL_PLANE, W_N2))})
    d = entries([s], act)
    steered = [e for e in d.entries if not e.excluded]
    assert steered and all(e.gateway is None and e.egress_ip is None for e in steered)


# ---- the module ------------------------------------------------------------------------------

def make_module(tmp_path: Path, local: LocalNode | None = None) -> tuple[EgressGateways, Any, Hive]:
    hive = Hive(agent=None, state_dir=tmp_path, clock=ManualClock())
    hive.provide(LOCAL_NODE, local or LocalNode("east", 1, "n1", "172.31.1.11", "10.1.1.0/24"))
    hive.provide(NODE_ATTRIBUTES, NodeAttributes())
    mf = hive.provide(MANIFESTS, manifests_table())
    nodes, ipc, ids = nodes_table(), ipcache_table(), identities_table()
    for n in NODES_ALL:
        nodes.upsert(n)
    for e in IPCACHE_ALL:
        ipc.upsert(e)
    for i in IDS.values():
        ids.upsert(i)
    hive.provide(NODES, nodes)
    hive.provide(IPCACHE, ipc)
    hive.provide(IDENTITIES, ids)
    return EgressGateways(hive, EgressConfig(hold_down=5.0)), mf, hive


def test_a_malformed_new_version_loses_nothing(tmp_path: Path) -> None:
    eg, mf, _ = make_module(tmp_path)
    mf.upsert(Manifest("west", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    before = eg.entries.all()
    assert len(before) == 4 and {e.policy for e in before} == {("west", "default", "legacy-db")}
    bad = copy.deepcopy(body())
    bad["spec"]["destinationCIDRs"] = ["198.51.100.0/33"]
    mf.upsert(Manifest("west", "EgressGatewayPolicy", "default", "legacy-db", bad))
    eg.recompute()
    assert eg.entries.all() == before
    listing = eg.listing()
    [why] = listing["rejected"].values()
    assert "spec.destinationCIDRs[0]" in why and "keeping the last good version" in why
    assert [p["name"] for p in listing["policies"]] == ["west/default/legacy-db"]
    mf.delete(("west", "EgressGatewayPolicy", "default", "legacy-db"))
    eg.recompute()
    assert eg.entries.all() == [] and eg.listing()["rejected"] == {}


def test_without_a_policy_a_recompute_reads_no_node_endpoint_or_identity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs on each batch of mesh changes: with hundreds of clusters a scan of the mesh's
    nodes there held the event loop for tens of ms each time."""
    from plexus.core.tables import Table

    eg, mf, hive = make_module(tmp_path)
    mf.upsert(Manifest("west", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    assert eg.entries.all()
    mf.delete(("west", "EgressGatewayPolicy", "default", "legacy-db"))
    mesh = (hive.require(NODES), hive.require(IPCACHE), hive.require(IDENTITIES))
    read: list[str] = []
    real_iter, real_get = Table.__iter__, Table.get

    def iterate(t: Table[Any, Any]) -> Any:
        if t in mesh:
            read.append(f"{t.name}: scan")
        return real_iter(t)

    def get(t: Table[Any, Any], key: Any) -> Any:
        if t in mesh:
            read.append(f"{t.name}: {key}")
        return real_get(t, key)
    monkeypatch.setattr(Table, "__iter__", iterate)
    monkeypatch.setattr(Table, "get", get)
    eg.recompute()
    assert read == [] and eg.entries.all() == [] and eg.steering.all() == []


def test_the_policy_stored_first_wins_whatever_this_agent_saw_first(tmp_path: Path) -> None:
    eg, mf, _ = make_module(tmp_path)
    young = body(egressIP="10.255.0.20")
    young["metadata"]["creationTimestamp"] = "2026-12-02T10:00:01Z"
    old = body()
    old["metadata"]["creationTimestamp"] = "2026-12-02T10:00:00Z"
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "a-young", young))
    eg.recompute()
    mf.upsert(Manifest("west", "EgressGatewayPolicy", "default", "z-old", old))
    eg.recompute()
    e = eg.entries.get(("10.1.1.5", "198.51.100.0/24"))
    assert e is not None and e.policy == ("west", "default", "z-old") and e.egress_ip == "10.255.0.10"
    [young_state] = [p for p in eg.listing()["policies"] if p["policy"] == "a-young"]
    assert young_state["conflicts"] == [
        "198.51.100.0/24: the older policy west/default/z-old wins (from 10.1.1.5, 10.2.1.5)"]


def test_listing_and_metrics_follow_health(tmp_path: Path) -> None:
    eg, mf, hive = make_module(tmp_path)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert [g["node"] for g in p["gateways"]] == ["east/n2", "west/n2"]
    assert [(a["sourceNode"], a["gateway"], a["egressIP"]) for a in p["active"]] == [
        ("east/n1", "east/n2", "10.255.0.10"), ("west/n1", "east/n2", "10.255.0.10")]
    assert [e["pod"] for e in p["endpoints"]] == ["bill-e", "bill-w"]
    eg.health.upsert(down("east/n1", E_N2))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert [a["gateway"] for a in p["active"]] == ["west/n2", "east/n2"]
    assert [g["healthy"] for g in p["gateways"]] == [False, True]
    reg = hive.metrics.registry
    assert reg.get_sample_value("plexus_egress_gateway_healthy",
                                {"policy": "east/default/legacy-db", "gateway": "east/n2"}) == 0
    assert reg.get_sample_value("plexus_egress_gateway_failovers_total",
                                {"policy": "east/default/legacy-db", "source_node": "east/n1"}) == 1
    assert eg.entries.get(("10.1.1.5", "198.51.100.0/24")).gateway == W_N2  # type: ignore[union-attr]


async def test_the_preferred_gateway_returns_when_the_hold_down_ends(tmp_path: Path) -> None:
    eg, mf, hive = make_module(tmp_path)
    clock = hive.clock
    assert isinstance(clock, ManualClock)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    await eg.start()
    try:
        eg.health.upsert(down("east/n1", E_N2))
        await _until(lambda: _gw(eg) == W_N2)
        eg.health.delete(("east/n1", E_N2))
        await _until(lambda: clock.waiters > 0 and eg.chooser.next_deadline() is not None)
        clock.advance(5.0)  # nothing else changes: the deadline alone brings it back
        await _until(lambda: _gw(eg) == E_N2)
    finally:
        await eg.stop()


def _gw(eg: EgressGateways) -> Any:
    e = eg.entries.get(("10.1.1.5", "198.51.100.0/24"))
    return e.gateway if e else None


async def _until(cond: Any) -> None:
    await eventually(cond, timeout=5.0)


def test_datapath_rows_are_this_nodes_share_of_the_entries() -> None:
    from bpf.egress import SnatEntry, SteeringEntry
    from egress.module import datapath_rows
    from egress.tables import EgressEntry

    me, other, gw2 = ("east", "n1"), ("east", "n2"), ("west", "n2")
    ips = {me: "172.31.1.11", other: "172.31.1.12", gw2: "172.31.2.12"}
    pol, own, elsewhere = ("east", "default", "p"), ("east", "default", "own"), ("east", "default", "x")
    dest, excl = "198.51.100.0/24", "198.51.100.128/25"
    rows = [
        # a local pod whose gateway is another node; its excluded destination
        EgressEntry("10.1.1.5", dest, elsewhere, me, gateway=gw2, egress_ip="10.255.0.11"),
        EgressEntry("10.1.1.5", excl, elsewhere, me, excluded=True),
        # a local pod with no healthy gateway: dropped
        EgressEntry("10.1.1.6", dest, elsewhere, me),
        # a remote pod of a policy this node is a gateway of (standby here: gw2 is active)
        EgressEntry("10.1.2.7", dest, pol, other, gateway=gw2, egress_ip="10.255.0.10"),
        EgressEntry("10.1.2.7", excl, pol, other, excluded=True),
        # a local pod whose gateway is this node, in Cilium's form (its own address)
        EgressEntry("10.1.1.8", dest, own, me, gateway=me, egress_ip=None),
        # nothing of this node's: not here
        EgressEntry("10.2.2.9", dest, elsewhere, gw2, gateway=gw2, egress_ip="10.255.0.11"),
        EgressEntry("fd00::1", "2001:db8::/64", pol, me, gateway=gw2, egress_ip="fd00::ffff"),
    ]
    steering, snat = datapath_rows(rows, me, ips.get, {pol: "10.255.0.10", own: "172.31.1.11"})
    assert steering == [
        SteeringEntry("10.1.1.5", dest, "172.31.2.12"),
        SteeringEntry("10.1.1.5", excl, excluded=True),
        SteeringEntry("10.1.1.6", dest, None),
        SteeringEntry("10.1.1.8", dest, excluded=True),  # leaves here, translated on the uplink
    ]
    assert snat == [
        SnatEntry("10.1.2.7", dest, "10.255.0.10", source_node="172.31.1.12"),  # ready for a failover
        SnatEntry("10.1.2.7", excl, None, excluded=True),
        SnatEntry("10.1.1.8", dest, "172.31.1.11"),
    ]


def test_the_active_gateway_holds_the_egress_ip_and_no_other_node_does() -> None:
    from egress.module import held_egress_ips
    from egress.tables import ActiveGateway, GatewayCandidate
    from plexus.core.prefixes import HostPrefix

    me, other = ("east", "n2"), ("west", "n2")
    pol = ("east", "default", "legacy-db")
    on_me = GatewayCandidate(me, 0, "10.255.0.10")
    active = [ActiveGateway(pol, ("east", "n1"), on_me, 0.0),
              ActiveGateway(pol, ("west", "n1"), on_me, 0.0),
              ActiveGateway(("east", "default", "own"), ("east", "n1"),
                            GatewayCandidate(me, 0, "172.31.1.12"), 0.0),  # its own address
              ActiveGateway(("east", "default", "b"), ("east", "n1"),
                            GatewayCandidate(other, 1, "10.255.0.11"), 0.0),
              ActiveGateway(("east", "default", "c"), ("east", "n1"), None, 0.0)]
    assert held_egress_ips(active, me, "172.31.1.12") == [
        HostPrefix("10.255.0.10/32", "egress", "egress IP of east/default/legacy-db")]
    assert held_egress_ips(active[3:], me, "172.31.1.12") == []


def test_the_later_a_gateway_comes_in_the_list_the_shorter_the_path_it_announces() -> None:
    from egress.module import MAX_PREPEND, held_egress_ips
    from egress.tables import ActiveGateway, GatewayCandidate

    a, b, c = ("east", "n2"), ("west", "n2"), ("west", "n3")
    pol = ("east", "default", "legacy-db")
    order = {pol: [a, b, c]}

    def prepend(me: tuple[str, str]) -> int:
        active = [ActiveGateway(pol, ("east", "n1"), GatewayCandidate(me, 0, "10.255.0.10"), 0.0)]
        [held] = held_egress_ips(active, me, "172.31.9.9", order)
        return held.as_path_prepend

    assert [prepend(a), prepend(b), prepend(c)] == [2, 1, 0]
    many = [("east", f"n{i}") for i in range(20)]
    active = [ActiveGateway(pol, ("east", "n1"), GatewayCandidate(many[0], 0, "10.255.0.10"), 0.0)]
    assert held_egress_ips(active, many[0], "172.31.9.9", {pol: many})[0].as_path_prepend == MAX_PREPEND
    # two policies on one egress IP: the longer path, so neither wins over a gateway it should not
    other = ("east", "default", "other")
    both = [ActiveGateway(k, ("east", "n1"), GatewayCandidate(a, 0, "10.255.0.10"), 0.0)
            for k in (other, pol)]
    held = held_egress_ips(both, a, "172.31.9.9", {pol: [a, b, c], other: [b, a]})
    assert [(h.prefix, h.as_path_prepend) for h in held] == [("10.255.0.10/32", 2)]


class FakePinger:
    """Answers the probes to the addresses in `up` at once."""

    def __init__(self) -> None:
        self.up: set[str] = set()
        self.sent: list[tuple[str, int]] = []
        self.on_reply: Any = None

    def open(self, on_reply: Any) -> None:
        self.on_reply = on_reply

    def send(self, ip: str, seq: int) -> None:
        self.sent.append((ip, seq))
        if ip in self.up:
            self.on_reply(ip, seq)

    def close(self) -> None:
        return


def test_a_gateway_missing_threshold_probes_is_unhealthy_and_one_answer_heals_it() -> None:
    from egress.probe import GatewayProber
    from egress.tables import health_table

    gw, other = ("east", "n2"), ("west", "n2")
    health = health_table()
    targets = {gw: "172.31.1.12", other: "172.31.2.12"}
    pinger = FakePinger()
    pinger.up = {"172.31.1.12", "172.31.2.12"}
    def healthy(gateway: tuple[str, str]) -> bool:
        row = health.get(("east/n1", gateway))
        assert row is not None
        return row.healthy

    prober = GatewayProber("east/n1", health, ManualClock(), lambda: targets, 0.1, 3, pinger)
    pinger.open(prober._on_reply)
    seq = iter(range(1, 100))
    prober.round(next(seq))
    prober.round(next(seq))
    assert {h.gateway: h.healthy for h in health} == {gw: True, other: True}
    pinger.up.discard("172.31.1.12")  # dies after answering its last probe
    prober.round(next(seq))  # that probe answered
    prober.round(next(seq))
    prober.round(next(seq))
    assert healthy(gw)  # two misses: not yet
    prober.round(next(seq))
    row = health.get(("east/n1", gw))
    assert row is not None and not row.healthy
    assert "3 probes to 172.31.1.12 unanswered" in row.reason
    assert healthy(other)
    pinger.up.add("172.31.1.12")
    prober.round(next(seq))  # the probe sent last round was lost; this one is answered
    prober.round(next(seq))
    assert healthy(gw)
    del targets[other]  # no policy needs it any more: its row goes
    prober.round(next(seq))
    assert [h.gateway for h in health] == [gw]


def test_the_standby_holds_the_egress_ip_once_it_finds_the_preferred_down(tmp_path: Path) -> None:
    from plexus.core.prefixes import HOST_PREFIXES

    standby, _mf, _ = make_module(tmp_path / "w", LocalNode("west", 2, "n2", "172.31.2.12",
                                                            "10.2.2.0/24"))
    preferred, mf2, _ = make_module(tmp_path / "e", LocalNode("east", 1, "n2", "172.31.1.12",
                                                              "10.1.2.0/24"))
    for eg, hive_mf in ((standby, _mf), (preferred, mf2)):
        hive_mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
        eg.recompute()
    announced = {name: [p.prefix for p in eg.hive.require(HOST_PREFIXES)]
                 for name, eg in (("standby", standby), ("preferred", preferred))}
    assert announced == {"standby": [], "preferred": ["10.255.0.10/32"]}
    assert standby.probe_targets() == {E_N2: "172.31.1.12"}  # what it must watch
    assert preferred.probe_targets() == {}
    # the standby translates the sources already, so a failover finds it ready
    assert {(r.source, r.egress_ip) for r in standby.snat} >= {("10.1.1.5", "10.255.0.10"),
                                                              ("10.2.1.5", "10.255.0.10")}
    standby.health.upsert(down("west/n2", E_N2))
    standby.recompute()
    assert [p.prefix for p in standby.hive.require(HOST_PREFIXES)] == ["10.255.0.10/32"]


# ---- health across the mesh, and what a gateway says of itself ---------------------------------

def test_a_sources_own_probes_decide_before_the_control_plane() -> None:
    up = GatewayHealth("east/n1", E_N2, healthy=True)
    cp = down(CONTROL_PLANE, E_N2)
    assert healthy({}, E_N1, E_N2)                                   # nothing said: healthy
    assert not healthy({cp.key: cp}, E_N1, E_N2)                      # no probe yet: the control plane
    assert healthy({cp.key: cp, up.key: up}, E_N1, E_N2)              # it reaches the gateway itself
    mine = down("east/n1", E_N2)
    assert not healthy({mine.key: mine}, E_N1, E_N2)
    assert healthy({mine.key: mine}, W_N1, E_N2)                      # another source's view


def test_verdicts_and_interfaces_read_from_a_record_skip_what_is_malformed() -> None:
    assert format_verdicts({W_N2: False, E_N2: True}) == "east/n2=up,west/n2=down"
    assert parse_verdicts("east/n2=up,west/n2=down") == {E_N2: True, W_N2: False}
    assert parse_verdicts("junk,=up,east/=down,east/n2=maybe,/n1=up,west/n2=down") == {W_N2: False}
    assert len(parse_verdicts(",".join(f"c/n{i}=up" for i in range(10_000)))) == MAX_REPORTED
    assert format_interfaces({"eth1": "10.9.9.9", "eth9": None}) == "eth1=10.9.9.9,eth9="
    assert parse_interfaces("eth1=10.9.9.9,eth9=,eth2=not-an-ip,eth3,=1.2.3.4,eth4=fd00::1") == {
        "eth1": "10.9.9.9", "eth9": None}


def annotated(key: tuple[str, str], **notes: str) -> Node:
    return replace(node(*key), annotations=notes)


def test_health_crosses_the_mesh_on_node_records(tmp_path: Path) -> None:
    eg, mf, hive = make_module(tmp_path)
    attrs = hive.require(NODE_ATTRIBUTES)
    nodes = hive.require(NODES)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.health.upsert(down("east/n1", E_N2))
    eg.recompute()
    # this node tells the mesh what its probes find
    assert attrs.annotations() == {ANNOTATION_PROBES: "east/n2=down"}
    # and reads what west/n1's probes found from west/n1's record: the gateway it really uses
    nodes.upsert(annotated(W_N1, **{ANNOTATION_PROBES: "east/n2=down,west/n2=up,junk"}))
    # its own record as read back from etcd never overrides its fresher prober
    nodes.upsert(annotated(E_N1, **{ANNOTATION_PROBES: "east/n2=up"}))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert [(a["sourceNode"], a["gateway"], a["healthFrom"]) for a in p["active"]] == [
        ("east/n1", "west/n2", "this node's probes"), ("west/n1", "west/n2", "its node's probes")]
    # the control plane of east cannot reach east/n2: a source with no verdict follows it
    nodes.upsert(annotated(W_N1))
    nodes.upsert(annotated(E_N2, **{ANNOTATION_CONTROL_PLANE: "3 probes to 172.31.1.12 unanswered"}))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert {a["sourceNode"]: (a["gateway"], a["healthFrom"]) for a in p["active"]}["west/n1"] == (
        "west/n2", "the control plane")
    assert ("control-plane", "east/n2", False, "3 probes to 172.31.1.12 unanswered") in [
        (h["reporter"], h["gateway"], h["healthy"], h["reason"]) for h in eg.listing()["health"]]
    eg.health.upsert(GatewayHealth("east/n1", E_N2, healthy=True))
    eg.recompute()
    assert attrs.annotations() == {ANNOTATION_PROBES: "east/n2=up"}
    # recovered: the hold-down keeps the standby a while
    assert eg.entries.get(("10.1.1.5", "198.51.100.0/24")).gateway == W_N2  # type: ignore[union-attr]


def test_a_gateway_that_cannot_translate_is_left_out_and_named(tmp_path: Path) -> None:
    eg, mf, hive = make_module(tmp_path)
    hive.require(NODES).upsert(annotated(E_N2, **{
        ANNOTATION_UNAVAILABLE: "the egress datapath is off on this node"}))
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert [g["node"] for g in p["gateways"]] == ["west/n2"]
    assert p["problems"] == ["spec.egressGateways[0]: gateway east/n2 cannot translate: "
                             "the egress datapath is off on this node"]
    assert eg.entries.get(("10.1.1.5", "198.51.100.0/24")).gateway == W_N2  # type: ignore[union-attr]


INTERFACE_POLICY = POLICY.replace("  egressIP: 10.255.0.10\n", "").replace(
    "io.cilium.k8s.policy.cluster: east}}", "io.cilium.k8s.policy.cluster: east}}\n    interface: eth1")


def test_the_interface_form_leaves_with_the_address_the_gateway_finds(tmp_path: Path) -> None:
    """Cilium's `interface`: the gateway looks its address up and tells the mesh; without one
    it is left out (and drops, never leaks, what still reaches it)."""
    eg, mf, hive = make_module(tmp_path, LocalNode("east", 1, "n2", "172.31.1.12", "10.1.2.0/24"))
    attrs, nodes = hive.require(NODE_ATTRIBUTES), hive.require(NODES)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body(INTERFACE_POLICY)))
    eg.recompute()
    assert eg.named_interfaces == {"eth1"}
    [p] = eg.listing()["policies"]
    assert [(g["node"], g["egressIP"], g["interface"]) for g in p["gateways"]] == [
        ("east/n2", None, "eth1"), ("west/n2", "172.31.2.12", None)]
    # not looked up yet: nothing said, and nothing leaves untranslated here
    assert ANNOTATION_INTERFACES not in attrs.annotations()
    assert {s.egress_ip for s in eg.snat if not s.excluded} == {None}
    eg.interface_ips = {"eth1": "192.0.2.7"}
    eg.recompute()
    assert attrs.annotations()[ANNOTATION_INTERFACES] == "eth1=192.0.2.7"
    assert {s.egress_ip for s in eg.snat if not s.excluded} == {"192.0.2.7"}
    assert not [h for h in eg.announced if h.owner == "egress"]  # its own address: routed already
    # what the others see once the record carries it
    nodes.upsert(annotated(E_N2, **attrs.annotations()))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert p["gateways"][0]["egressIP"] == "192.0.2.7"
    eg.interface_ips = {"eth1": None}
    nodes.upsert(annotated(E_N2, **{ANNOTATION_INTERFACES: "eth1="}))
    eg.recompute()
    [p] = eg.listing()["policies"]
    assert [g["node"] for g in p["gateways"]] == ["west/n2"]
    assert p["problems"] == ["spec.egressGateways[0].interface: eth1 has no IPv4 address on "
                             "gateway east/n2"]


async def test_the_egress_module_off_tells_the_mesh_this_node_cannot_translate(tmp_path: Path) -> None:
    hive = Hive(agent=None, state_dir=tmp_path, clock=ManualClock())
    hive.provide(LOCAL_NODE, LocalNode("east", 1, "n2", "172.31.1.12", "10.1.2.0/24"))
    hive.provide(MANIFESTS, manifests_table())
    attrs = hive.provide(NODE_ATTRIBUTES, NodeAttributes())
    await EgressGateways(hive, EgressConfig(enabled=False)).start()
    assert attrs.annotations() == {ANNOTATION_UNAVAILABLE: "the egress module is off on this node"}
    eg, _mf, hive = make_module(tmp_path)
    eg.config = EgressConfig(datapath=False)
    await eg.start()
    try:
        assert hive.require(NODE_ATTRIBUTES).annotations() == {
            ANNOTATION_UNAVAILABLE: "the egress datapath is off on this node"}
    finally:
        await eg.stop()


def test_interface_addresses_are_looked_up_by_name() -> None:
    assert interface_addresses(["lo", "plxnosuch0"]) == {"lo": "127.0.0.1", "plxnosuch0": None}


def test_the_mesh_index_reads_again_only_what_changed_and_stays_equal_to_a_full_read() -> None:
    ipc, ids, nodes = ipcache_table(), identities_table(), nodes_table()
    for t, rows in ((ipc, IPCACHE_ALL), (ids, IDS.values()), (nodes, NODES_ALL)):
        for r in rows:
            t.upsert(r)  # type: ignore[arg-type]
    index = MeshIndex(ipc, ids, nodes)

    def same() -> None:
        index.refresh()
        full = mesh_endpoints(ipc.all(), {i.id: i for i in ids}, nodes.all())
        assert sorted(index.rows.values(), key=lambda m: m.ip) == sorted(full, key=lambda m: m.ip)
        assert sum(len(g) for g in index.groups.values()) == len(full)
        assert all(g for g in index.groups.values())  # no empty group is kept

    same()
    reads: list[str] = []
    reader = index._reader
    assert reader is not None
    real = reader.read

    def counting(e: IPIdentity) -> MeshEndpoint | None:
        reads.append(e.ip)
        return real(e)
    reader.read = counting  # type: ignore[method-assign]
    ipc.upsert(pod("10.1.1.9", 65537, "172.31.1.12", "default", "bill-e2", "east"))
    ipc.delete("10.1.1.6/32")
    ipc.upsert(pod("10.1.1.5", 65538, "172.31.1.11", "default", "now-web", "east"))  # relabelled
    same()
    assert sorted(reads) == ["10.1.1.5", "10.1.1.9"]  # one read each, nothing else
    # a node or an identity changed: every row is read again (their labels or nodes may move)
    nodes.upsert(replace(node("east", "n2"), addresses=(NodeAddress("InternalIP", "172.31.1.99"),)))
    same()
    assert index.rows["10.1.1.9/32"].node is None
    ids.upsert(identity(65537, "payments", "east", "default"))
    same()
    assert index.rows["10.1.1.9/32"].labels["app"] == "payments"
    index.forget()
    assert index.rows == {} and index.groups == {}
    same()


def test_selection_by_group_matches_selection_one_by_one() -> None:
    eps = endpoints()
    p = policy(selectors=[{"podSelector": {"matchLabels": {"app": "billing"}}}])
    assert selected(p, group_endpoints(eps)) == tuple(e for e in eps if selects(p, e))
    lone = MeshEndpoint("10.9.9.9", "east", "default", "x", {"app": "billing"}, {}, None)
    assert [e.ip for e in selected(p, group_endpoints([*eps, lone]))][-1] == "10.9.9.9"


def test_gateways_are_derived_again_only_when_the_policy_or_the_nodes_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import egress.module

    calls: list[str] = []
    real = egress.module.resolve_gateways  # type: ignore[attr-defined]

    def counting(p: EgressGatewayPolicy, nodes: Any) -> Any:
        calls.append(p.metadata.name)
        return real(p, nodes)
    monkeypatch.setattr(egress.module, "resolve_gateways", counting)
    eg, mf, hive = make_module(tmp_path)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    hive.require(IPCACHE).upsert(pod("10.1.1.9", 65537, "172.31.1.11", "default", "b2", "east"))
    eg.recompute()
    assert calls == ["legacy-db"]  # a pod changed: the gateways stay as derived
    assert eg.entries.get(("10.1.1.9", "198.51.100.0/24")) is not None
    hive.require(NODES).upsert(replace(node("east", "n2"), labels={"zone": "a"}))
    eg.recompute()
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db",
                       body(egressIP="10.255.0.11")))
    eg.recompute()
    assert calls == ["legacy-db"] * 3
    assert eg.entries.get(("10.1.1.9", "198.51.100.0/24")).egress_ip == "10.255.0.11"  # type: ignore[union-attr]


def test_a_translation_is_named_after_the_policy_whose_entry_it_meets(tmp_path: Path) -> None:
    eg, mf, hive = make_module(tmp_path)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    assert hive.require(EGRESS_POLICY_OF) == eg.policy_of
    assert eg.policy_of("10.2.1.5", "198.51.100.10") == "east/default/legacy-db"
    assert eg.policy_of("10.2.1.5", "198.51.100.200") == ""  # excluded (198.51.100.128/25)
    assert eg.policy_of("10.1.1.6", "198.51.100.10") == ""   # not selected
    assert eg.policy_of("10.2.1.5", "not-an-ip") == ""


def test_a_change_of_pods_no_policy_selects_derives_nothing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import egress.module

    derived: list[int] = []
    real = egress.module.entries  # type: ignore[attr-defined]

    def counting(*a: Any) -> Any:
        derived.append(1)
        return real(*a)
    monkeypatch.setattr(egress.module, "entries", counting)
    eg, mf, hive = make_module(tmp_path)
    ipc = hive.require(IPCACHE)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db", body()))
    eg.recompute()
    assert len(derived) == 1
    ipc.upsert(pod("10.1.1.20", 65538, "172.31.1.11", "default", "web2", "east"))  # app=web
    ipc.delete("10.1.1.6/32")
    eg.recompute()
    assert len(derived) == 1  # nothing a policy selects: skipped
    ipc.upsert(pod("10.1.1.21", 65537, "172.31.1.11", "default", "bill2", "east"))
    eg.recompute()
    assert len(derived) == 2 and eg.entries.get(("10.1.1.21", "198.51.100.0/24")) is not None
    ipc.delete("10.1.1.21/32")  # a selected pod gone: its entries go
    eg.recompute()
    assert len(derived) == 3 and eg.entries.get(("10.1.1.21", "198.51.100.0/24")) is None
    eg.health.upsert(down("east/n1", E_N2))  # anything else: derived again
    eg.recompute()
    assert len(derived) == 4 and _gw(eg) == W_N2

"""BGP as operators run it: IPv6 routes over an IPv4 session, configs ExaBGP refuses, every
local service, and what the CLI says went on the wire."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

from bgp.announced import on_the_wire, wire_text
from bgp.commands import bulk_commands, withdraw_commands
from bgp.launcher import refusal
from bgp.models import MANIFEST_KINDS
from bgp.render import render_config
from bgp.speaker import Speaker, sample_routes
from bgp.tables import Neighbor, RouteAttrs, eligible_services, resolve
from clustermesh.manifests import Service
from clustermesh.models import ClusterService, L4Addr
from plexus.core.config import parse
from plexus.core.manifests import Manifest, ManifestCache
from plexus.core.node import Endpoint, LocalNode

A = ipaddress.ip_address
N = ipaddress.ip_network
V4 = ipaddress.IPv4Address
LOCAL = LocalNode("east", 1, "n1", "10.0.0.1", "10.1.1.0/24", "fd00:1:1::/64")
PEER = A("10.0.0.254")
SOCK = Path("/run/plexus-test/api.sock")


def m(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> Manifest:
    return Manifest("east", kind, "default", name, {
        "apiVersion": "plexus.io/v1", "kind": kind, "metadata": {"name": name, "labels": labels or {}},
        "spec": spec})


DUAL = [
    m("BGPClusterConfig", "c", {"bgpInstances": [{"name": "i0", "localASN": 65001, "peers": [
        {"name": "r", "peerAddress": str(PEER), "peerASN": 65000, "peerConfigRef": {"name": "p"}}]}]}),
    m("BGPPeerConfig", "p", {"families": [
        {"afi": "ipv4", "safi": "unicast", "advertisements": {"matchLabels": {"a": "b"}}},
        {"afi": "ipv6", "safi": "unicast", "advertisements": {"matchLabels": {"a": "b"}}}]}),
    m("BGPAdvertisement", "pods", {"advertisements": [
        {"advertisementType": "PodCIDR", "attributes": {"localPreference": 200}}]}, {"a": "b"}),
]
NEXT_HOP = m("BGPNodeConfigOverride", "n1", {"bgpInstances": [{"name": "i0", "ipv6NextHop": "fd00:ff::1"}]})


def _resolve(manifests: list[Manifest], services: list[ClusterService] | None = None) -> Any:
    cache = ManifestCache(MANIFEST_KINDS)
    cache.sync(manifests)
    return resolve(cache, LOCAL, services or [], Path("/nonexistent"))


def test_ipv6_routes_over_an_ipv4_session_carry_the_configured_ipv6_next_hop() -> None:
    res = _resolve([*DUAL, NEXT_HOP])
    assert res.problems == {}
    routes = res.routes[PEER]
    assert routes == {N("10.1.1.0/24"): RouteAttrs(local_pref=200),
                      N("fd00:1:1::/64"): RouteAttrs(local_pref=200, next_hop=A("fd00:ff::1"))}
    text = render_config(res.neighbors.values(), res.routes, SOCK, 100)
    assert "route fd00:1:1::/64 next-hop fd00:ff::1 local-preference 200;" in text
    assert "route 10.1.1.0/24 next-hop self local-preference 200;" in text
    assert refusal(text) == ""  # ExaBGP's own parser takes it


def test_without_an_ipv6_next_hop_the_ipv6_routes_wait_and_the_problem_says_what_to_set() -> None:
    res = _resolve(DUAL)
    assert res.routes[PEER] == {N("10.1.1.0/24"): RouteAttrs(local_pref=200)}
    assert PEER in res.neighbors  # the IPv4 session and its routes stay
    (problem,) = res.problems.values()
    assert "IPv6 routes over an IPv4 session" in problem and "ipv6NextHop" in problem


def test_exabgp_refuses_next_hop_self_across_families_and_says_why() -> None:
    n = Neighbor(PEER, 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"))
    bad = render_config([n], {PEER: {N("fd00:1:1::/64"): RouteAttrs()}}, SOCK, 100)
    assert "does not have the same family as the BGP tcp session" in refusal(bad)


def test_withdrawals_carry_the_next_hop_they_were_announced_with() -> None:
    nh = {N("fd00:1:1::/64"): A("fd00:ff::1"), N("10.1.1.0/24"): None}
    assert withdraw_commands(PEER, list(nh), 100, nh) == [
        "neighbor 10.0.0.254 withdraw attributes next-hop self nlri 10.1.1.0/24",
        "neighbor 10.0.0.254 withdraw attributes next-hop fd00:ff::1 nlri fd00:1:1::/64"]
    bulk = bulk_commands(PEER, list(nh), [], 100, nh)
    assert bulk[0].endswith(" withdraw ipv4 GAoBAQ==")
    assert bulk[1].startswith("neighbor 10.0.0.254 plexus-bulk withdraw ipv6 ")
    assert bulk[1].endswith(" next-hop fd00:ff::1")


def test_a_refused_config_is_reported_and_the_speaker_falls_back(tmp_path: Path) -> None:
    async def go() -> None:
        n = Neighbor(PEER, 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"))
        wanted = {PEER: {N("10.1.1.0/24"): RouteAttrs(), N("fd00:1:1::/64"): RouteAttrs()}}
        sp = Speaker(tmp_path / "bgp", [str(tmp_path / "no-such-exabgp")], desired=lambda: wanted)
        sp.configure({PEER: n})
        start = await sp._startable()
        assert start == {PEER: n}  # the peers start; their routes go through the API
        assert "does not have the same family" in sp.refused
        assert "ExaBGP refused the config" in sp.peers[PEER].reason
        wanted[PEER].pop(N("fd00:1:1::/64"))
        assert await sp._startable() == {PEER: n}
        assert sp.refused == "" and sp.peers[PEER].reason == ""
    asyncio.run(go())


def test_sample_routes_keep_one_prefix_per_family_and_attributes() -> None:
    a, b = RouteAttrs(), RouteAttrs(local_pref=5)
    routes = {PEER: {N("10.1.0.0/24"): a, N("10.2.0.0/24"): a, N("10.3.0.0/24"): b, N("fd00::/64"): a}}
    assert sample_routes(routes) == {PEER: {N("10.1.0.0/24"): a, N("10.3.0.0/24"): b, N("fd00::/64"): a}}


def test_the_wire_view_drops_local_pref_on_ebgp_and_prepends_our_as() -> None:
    a = RouteAttrs(communities=((65000, 1),), local_pref=200)
    ebgp = Neighbor(PEER, 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"))
    ibgp = Neighbor(PEER, 65001, 65001, V4("10.0.0.1"), A("10.0.0.1"))
    assert on_the_wire(ebgp, a) == {"origin": "igp", "asPath": [65001], "nextHop": "10.0.0.1",
                                    "localPreference": None, "communities": ["65000:1"],
                                    "largeCommunities": []}
    assert wire_text(on_the_wire(ebgp, a)) == "next-hop 10.0.0.1 as-path [65001] community [65000:1]"
    assert on_the_wire(ibgp, a)["localPreference"] == 200 and on_the_wire(ibgp, a)["asPath"] == []
    assert on_the_wire(ibgp, RouteAttrs())["localPreference"] == 100  # ExaBGP's default on iBGP
    v6 = RouteAttrs(next_hop=A("fd00:ff::1"))
    assert on_the_wire(ebgp, v6)["nextHop"] == "fd00:ff::1"


def svc_manifest(name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> Service:
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": {"bgp": "y"}, "annotations": annotations or {}},
            "spec": {"ports": [{"port": 80}], **spec}}
    return parse(Service, body, f"Service/{name}")


def test_every_local_service_is_eligible_not_only_global_ones() -> None:
    local_lb = svc_manifest("web", {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                                    "loadBalancerIP": "192.0.2.10"})
    local_only = svc_manifest("api", {"clusterIP": "10.96.0.11", "loadBalancerIP": "192.0.2.11",
                                      "externalTrafficPolicy": "Local", "selector": {"app": "api"}})
    elsewhere = svc_manifest("db", {"clusterIP": "10.96.0.12", "loadBalancerIP": "192.0.2.12",
                                    "externalTrafficPolicy": "Local", "selector": {"app": "db"}})
    published = ClusterService("east", "default", "mesh-only", labels={"bgp": "y"},
                               frontends={"10.96.0.13": {"h": L4Addr("TCP", 80)}})
    pod = Endpoint("c1", "10.1.1.7", "default", "api-0", {"app": "api"}, "veth0")
    services = eligible_services([published], [local_lb, local_only, elsewhere], LOCAL, [pod])
    assert [s.name for s in services] == ["api", "db", "mesh-only", "web"]
    adverts = [m("BGPAdvertisement", "svc", {"advertisements": [
        {"advertisementType": "Service", "service": {"addresses": ["LoadBalancerIP", "ClusterIP"]},
         "selector": {"matchLabels": {"bgp": "y"}}}]}, {"a": "b"})]
    res = _resolve([*DUAL[:2], *adverts], services)
    # db asks for local backends and has none on this node; the others are announced
    assert set(res.routes[PEER]) == {N(x) for x in ("10.96.0.10/32", "192.0.2.10/32", "10.96.0.11/32",
                                                    "192.0.2.11/32", "10.96.0.13/32")}


def test_the_wire_view_shows_a_prepended_path_as_it_is() -> None:
    ebgp = Neighbor(PEER, 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"))
    wire = on_the_wire(ebgp, RouteAttrs(as_path=(65001, 65001)))
    assert wire["asPath"] == [65001, 65001]
    assert wire_text(wire) == "next-hop 10.0.0.1 as-path [65001 65001]"

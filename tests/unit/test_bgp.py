"""BGP: manifest validation, desired routes, config rendering, diffing, command builder."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from bgp.announced import Announced
from bgp.api import ApiClient
from bgp.commands import (
    CommandError,
    add_neighbors_command,
    announce_commands,
    remove_neighbor_command,
    safe,
    withdraw_commands,
)
from bgp.models import MANIFEST_KINDS, BGPPeerConfig
from bgp.ops import RoutesOps
from bgp.render import render_config
from bgp.speaker import Speaker
from bgp.tables import Neighbor, PeerRoutes, RouteAttrs, resolve
from clustermesh.models import ClusterService, L4Addr
from plexus.core.config import ConfigError, parse
from plexus.core.manifests import Manifest, ManifestCache
from plexus.core.node import LocalNode
from plexus.core.reconciler import PermanentError, TemporaryError
from tests.support import eventually

A = ipaddress.ip_address
N = ipaddress.ip_network
V4 = ipaddress.IPv4Address
LOCAL = LocalNode("east", 1, "n1", "10.0.0.1", "10.1.1.0/24", labels={"rack": "r1"})


def m(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> Manifest:
    return Manifest("east", kind, "default", name, {
        "apiVersion": "plexus.io/v1", "kind": kind, "metadata": {"name": name, "labels": labels or {}},
        "spec": spec})


def check(kind: str, spec: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse(MANIFEST_KINDS[kind], m(kind, "x", spec).body, f"{kind}/x")
    return str(e.value)


CC = {"bgpInstances": [{"name": "i0", "localASN": 65001, "peers": [
    {"name": "r", "peerAddress": "10.0.0.254", "peerASN": 65000, "peerConfigRef": {"name": "p"}}]}]}


@pytest.mark.parametrize("kind,spec,field", [
    ("BGPClusterConfig", {"bgpInstances": [{"name": "i", "localASN": 0}]}, "spec.bgpInstances[0].localASN"),
    ("BGPClusterConfig", {"bgpInstances": [{"name": "i", "localASN": 4294967296}]},
     "spec.bgpInstances[0].localASN"),
    ("BGPClusterConfig", {"bgpInstances": [{"name": "i", "localASN": 1, "peers": [
        {"name": "r", "peerAddress": "10.0.0.300", "peerASN": 1}]}]}, "peers[0].peerAddress"),
    ("BGPPeerConfig", {"timers": {"holdTimeSeconds": 2}}, "spec.timers.holdTimeSeconds"),
    ("BGPPeerConfig", {"timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 9}}, "spec.timers"),
    ("BGPPeerConfig", {"families": [{"afi": "ipv4", "safi": "multicast"}]}, "spec.families[0].safi"),
    ("BGPPeerConfig", {"families": [{"afi": "l2vpn", "safi": "unicast"}]}, "spec.families[0].afi"),
    ("BGPPeerConfig", {"authSecretRef": "a", "authPasswordFile": "/x"}, "spec"),
    ("BGPAdvertisement", {"advertisements": [{"advertisementType": "PodCIDR", "attributes": {
        "communities": {"standard": ["65536:1"]}}}]}, "communities.standard[0]"),
    ("BGPAdvertisement", {"advertisements": [{"advertisementType": "PodCIDR", "attributes": {
        "communities": {"large": ["1:2"]}}}]}, "communities.large[0]"),
    ("BGPAdvertisement", {"advertisements": [{"advertisementType": "PodCIDR", "attributes": {
        "communities": {"wellKnown": ["no-such"]}}}]}, "communities.wellKnown[0]"),
    ("BGPAdvertisement", {"advertisements": [{"advertisementType": "PodCIDR", "attributes": {
        "localPreference": -1}}]}, "attributes.localPreference"),
    ("BGPAdvertisement", {"advertisements": [{"advertisementType": "Service"}]}, "spec.advertisements[0]"),
])
def test_invalid_manifests_name_the_field(kind: str, spec: dict[str, Any], field: str) -> None:
    msg = check(kind, spec)
    assert msg.startswith(f"{kind}/x: spec") and f"{field}" in msg


def test_bad_new_version_keeps_last_good() -> None:
    cache = ManifestCache(MANIFEST_KINDS)
    good = m("BGPPeerConfig", "p", {"timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3}})
    cache.sync([good])
    bad = m("BGPPeerConfig", "p", {"timers": {"holdTimeSeconds": 1}})
    cache.sync([bad])
    (problem,) = cache.problems.values()
    assert "spec.timers.holdTimeSeconds" in problem and "last good" in problem
    (peer,) = cache.of("BGPPeerConfig")
    assert isinstance(peer, BGPPeerConfig) and peer.spec.timers.hold_time_seconds == 9
    cache.sync([])
    assert not cache.good and not cache.problems


def _resolve(manifests: list[Manifest], services: tuple[ClusterService, ...] = (),
             tmp: Path = Path("/nonexistent")) -> Any:
    cache = ManifestCache(MANIFEST_KINDS)
    cache.sync(manifests)
    return resolve(cache, LOCAL, services, tmp)


def test_desired_routes_union_communities_and_highest_local_pref(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    svc = ClusterService("east", "default", "web", frontends={"10.96.0.1": {"h": L4Addr("TCP", 80)}},
                         backends={"10.2.0.9": {"h": L4Addr("TCP", 80)}},
                         labels={"bgp": "y", "plexus.io/external-traffic-policy": "Local"})
    svc2 = ClusterService("east", "default", "api", frontends={"10.96.0.2": {"h": L4Addr("TCP", 80)}},
                          backends={"10.1.1.9": {"h": L4Addr("TCP", 80)}},
                          labels={"bgp": "y", "plexus.io/external-traffic-policy": "Local",
                                  "plexus.io/external-ips": "198.51.100.1"})
    res = _resolve([
        m("BGPClusterConfig", "c", {**CC, "nodeSelector": {"matchLabels": {"rack": "r1"}}}),
        m("BGPPeerConfig", "p", {"authSecretRef": "pw", "families": [
            {"afi": "ipv4", "safi": "unicast", "advertisements": {"matchLabels": {"a": "b"}}}]}),
        m("BGPAdvertisement", "a1", {"advertisements": [
            {"advertisementType": "PodCIDR", "attributes": {"communities": {"standard": ["1:1"],
                                                                            "wellKnown": ["no-export"]},
                                                            "localPreference": 100}},
            {"advertisementType": "Service", "service": {"addresses": ["ClusterIP", "ExternalIP"]},
             "selector": {"matchLabels": {"bgp": "y"}}}]}, {"a": "b"}),
        m("BGPAdvertisement", "a2", {"advertisements": [
            {"advertisementType": "PodCIDR", "attributes": {"communities": {"standard": ["2:2"],
                                                                            "large": ["1:2:3"]},
                                                            "localPreference": 150}}]}, {"a": "b"}),
        m("BGPAdvertisement", "unselected", {"advertisements": [{"advertisementType": "PodCIDR"}]},
          {"a": "c"}),
        m("BGPNodeConfigOverride", "n1", {"bgpInstances": [{"name": "i0", "localASN": 65099,
                                                            "routerID": "1.1.1.1"}]}),
    ], (svc, svc2), tmp_path)
    assert res.problems == {}
    (n,) = res.neighbors.values()
    assert (n.local_asn, str(n.router_id), n.password, n.hold_time) == (65099, "1.1.1.1", "secret", 90)
    assert "secret" not in repr(n)
    routes = res.routes[A("10.0.0.254")]
    # eTP Local: web's backend is not on this node, api's is
    assert set(routes) == {N("10.1.1.0/24"), N("10.96.0.2/32"), N("198.51.100.1/32")}
    assert routes[N("10.1.1.0/24")] == RouteAttrs(((1, 1), (2, 2), (65535, 65281)), ((1, 2, 3),), 150)


def test_node_selector_and_missing_references() -> None:
    res = _resolve([m("BGPClusterConfig", "c", {**CC, "nodeSelector": {"matchLabels": {"rack": "r2"}}})])
    assert res.neighbors == {}
    res = _resolve([m("BGPClusterConfig", "c", CC)])
    assert res.neighbors == {} and "peerConfigRef.name: no BGPPeerConfig 'p'" in str(res.problems)
    res = _resolve([m("BGPClusterConfig", "c", CC), m("BGPPeerConfig", "p", {"authSecretRef": "nope"})])
    assert "cannot read password file" in str(res.problems)


def test_command_builder_groups_by_attributes_and_batches() -> None:
    a1, a2 = RouteAttrs(((65000, 1),), ((1, 2, 3),), 200), RouteAttrs()
    routes = [(N(f"10.0.{i}.0/24"), a1) for i in range(5)] + [(N("10.9.0.0/16"), a2), (N("fd00::/64"), a2)]
    cmds = announce_commands(A("10.0.0.254"), routes, batch=3)
    assert cmds == [
        "neighbor 10.0.0.254 announce attributes next-hop self nlri 10.9.0.0/16",
        "neighbor 10.0.0.254 announce attributes next-hop self local-preference 200 community [65000:1] "
        "large-community [1:2:3] nlri 10.0.0.0/24 10.0.1.0/24 10.0.2.0/24",
        "neighbor 10.0.0.254 announce attributes next-hop self local-preference 200 community [65000:1] "
        "large-community [1:2:3] nlri 10.0.3.0/24 10.0.4.0/24",
        "neighbor 10.0.0.254 announce attributes next-hop self nlri fd00::/64",
    ]
    assert withdraw_commands(A("10.0.0.254"), [N("10.9.0.0/16")], 10) == [
        "neighbor 10.0.0.254 withdraw attributes next-hop self nlri 10.9.0.0/16"]


@pytest.mark.parametrize("bad", ["a\nb", "x\r", "\x00", "announce\x7f", "t\tab"])
def test_control_characters_are_rejected(bad: str) -> None:
    with pytest.raises(CommandError):
        safe(bad)
    # strings where addresses belong, against the types on purpose: the encoder checks them anyway
    with pytest.raises(CommandError):
        announce_commands(bad, [], 1)  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        announce_commands(A("10.0.0.1"), [(bad, RouteAttrs())], 1)  # type: ignore[list-item]


def test_password_with_quote_cannot_reach_config() -> None:
    n = Neighbor(A("10.0.0.2"), 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"), password='x";\nprocess')
    with pytest.raises(CommandError):
        render_config([n], {}, Path("/run/x.sock"), 10)


def test_render_config() -> None:
    n = Neighbor(A("10.0.0.2"), 65000, 65001, V4("10.0.0.1"), A("10.0.0.1"), hold_time=9, multihop=2,
                 password="pw", graceful_restart=60, families=("ipv4",))
    text = render_config([n], {A("10.0.0.2"): {N("10.1.0.0/24"): RouteAttrs(local_pref=5)}},
                         Path("/run/x.sock"), 10)
    for line in ["neighbor 10.0.0.2 {", "local-as 65001;", "peer-as 65000;", "hold-time 9;",
                 "outgoing-ttl 2;", 'md5-password "pw";', "graceful-restart 60;", "ipv4 unicast;",
                 "processes [ plexus ];", "route 10.1.0.0/24 next-hop self local-preference 5;",
                 "manual-eor true;"]:
        assert line in text
    assert "ipv6 unicast" not in text


class FakeSpeaker(Speaker):
    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), [], batch=100)
        self.sent: list[list[str]] = []
        self.api._ready.set()
        self.neighbors = {A("10.0.0.2"): Neighbor(A("10.0.0.2"), 1, 2, V4("10.0.0.1"), A("10.0.0.1"))}
        self.loaded = dict(self.neighbors)

    async def send(self, commands: list[str]) -> None:
        self.sent.append(commands)


def test_ops_send_only_the_difference() -> None:
    async def go() -> None:
        sp = FakeSpeaker()
        ops = RoutesOps(sp)
        peer = A("10.0.0.2")
        a, b = RouteAttrs(), RouteAttrs(local_pref=7)
        await ops.update(PeerRoutes(peer, {N("10.1.0.0/24"): a, N("10.2.0.0/24"): a}))
        await ops.update(PeerRoutes(peer, {N("10.1.0.0/24"): a, N("10.2.0.0/24"): a}))
        assert len(sp.sent) == 2 and sp.sent[1] == []
        await ops.update(PeerRoutes(peer, {N("10.1.0.0/24"): b, N("10.3.0.0/24"): a}))
        assert sp.sent[2] == [
            "neighbor 10.0.0.2 withdraw attributes next-hop self nlri 10.2.0.0/24",
            "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.3.0.0/24",
            "neighbor 10.0.0.2 announce attributes next-hop self local-preference 7 nlri 10.1.0.0/24"]
        await ops.prune([])
        assert sp.sent[3] == [
            "neighbor 10.0.0.2 withdraw attributes next-hop self nlri 10.1.0.0/24 10.3.0.0/24"]
        assert sp.announced == {}
    asyncio.run(go())


class FailingSpeaker(FakeSpeaker):
    """ExaBGP answers route commands with `error` (or not at all): End-of-RIB still goes out."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def send(self, commands: list[str]) -> None:
        if any(" announce eor " not in c for c in commands):
            raise self.error
        await super().send(commands)


def test_end_of_rib_follows_the_routes_once_per_session() -> None:
    async def go() -> None:
        sp = FakeSpeaker()
        ops = RoutesOps(sp)
        peer = A("10.0.0.2")
        sp.loaded = {peer: dataclasses.replace(sp.loaded[peer], families=("ipv4", "ipv6"))}
        routes = {N("10.1.0.0/24"): RouteAttrs()}
        await ops.update(PeerRoutes(peer, routes))  # session not up: no End-of-RIB yet
        assert sp.sent == [["neighbor 10.0.0.2 announce attributes next-hop self nlri 10.1.0.0/24"]]
        sp._on_state(peer, "established", "")
        assert peer in sp.eor_due and not sp.peers[peer].end_of_rib
        await ops.update(PeerRoutes(peer, routes))  # nothing new to send: End-of-RIB behind what was
        assert sp.sent[1:] == [[], ["neighbor 10.0.0.2 announce eor ipv4 unicast",
                                    "neighbor 10.0.0.2 announce eor ipv6 unicast"]]
        assert peer not in sp.eor_due and sp.peers[peer].end_of_rib > 0
        await ops.update(PeerRoutes(peer, {**routes, N("10.2.0.0/24"): RouteAttrs()}))
        assert sp.sent[3:] == [["neighbor 10.0.0.2 announce attributes next-hop self nlri 10.2.0.0/24"]]
        sp._on_state(peer, "active", "")
        sp._on_state(peer, "established", "")  # a new session: ExaBGP resends, End-of-RIB again
        await ops.update(PeerRoutes(peer, {**routes, N("10.2.0.0/24"): RouteAttrs()}))
        assert sp.sent[-1][0] == "neighbor 10.0.0.2 announce eor ipv4 unicast"

        # a push that times out is retried before End-of-RIB; one ExaBGP refuses gets End-of-RIB
        for error, eor in ((TemporaryError("no answer"), False), (PermanentError("refused"), True)):
            sp = FailingSpeaker(error)
            sp._on_state(peer, "established", "")
            with pytest.raises(type(error)):
                await RoutesOps(sp).update(PeerRoutes(peer, routes))
            assert (peer not in sp.eor_due) is eor
            assert [c[0] for c in sp.sent] == (["neighbor 10.0.0.2 announce eor ipv4 unicast"] if eor else [])
    asyncio.run(go())


def test_speaker_that_cannot_start_reports_and_retries(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Speaker(tmp_path / "bgp", [str(tmp_path / "no-such-exabgp")], backoff_max=0.2)
        sp.configure({A("10.0.0.2"): Neighbor(A("10.0.0.2"), 1, 2, V4("10.0.0.1"), A("10.0.0.1"))})
        task = asyncio.ensure_future(sp.run())
        try:
            await eventually(lambda: "cannot start ExaBGP" in sp.last_exit, 5, 0.01, "start failure reported")
            assert "cannot start ExaBGP" in sp.peers[A("10.0.0.2")].reason
            assert not task.done()  # still supervising
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(go())


def test_announced_is_one_record_per_peer() -> None:
    ann = Announced()
    p1, p2 = A("10.0.0.2"), A("fd00::2")
    a = RouteAttrs(local_pref=5)
    ann.reset({p1: {N("10.2.0.0/24"): a}, p2: {}})
    assert dict(ann) == {p1: {N("10.2.0.0/24"): a}} and ann.count(p2) == 0
    ann.sent(p2, [], [(N("fd10::/64"), a)])
    ann.sent(p1, [N("10.2.0.0/24")], [(N("10.1.0.0/24"), a), (N("0.0.0.0/0"), a)])
    assert ann.rows() == [(p1, N("0.0.0.0/0"), a), (p1, N("10.1.0.0/24"), a), (p2, N("fd10::/64"), a)]
    assert ann.rows(p2) == [(p2, N("fd10::/64"), a)]
    ann.sent(p2, [N("fd10::/64")], [])
    assert p2 not in ann
    ann.drop(p1)
    assert ann == {}


class FakeApi(ApiClient):
    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))
        self.sent: list[list[str]] = []

    def ready(self) -> bool:
        return True

    async def extended(self) -> bool:
        return True

    async def send(self, commands: list[str]) -> None:
        self.sent.append(commands)


def test_peers_added_or_removed_change_only_themselves(tmp_path: Path) -> None:
    async def go() -> None:
        sp = Speaker(tmp_path / "bgp", [])
        sp.run_dir.mkdir()
        api = FakeApi()
        sp.api = api
        p1, p2 = A("10.0.0.2"), A("10.0.0.3")
        n1 = Neighbor(p1, 1, 2, V4("10.0.0.1"), A("10.0.0.1"))
        n2 = Neighbor(p2, 1, 2, V4("10.0.0.1"), A("10.0.0.1"))
        sp.neighbors = sp.loaded = {p1: n1}
        sp.announced.reset({p1: {N("10.1.0.0/24"): RouteAttrs()}})

        sp.configure({p1: n1, p2: n2})
        assert await sp._change_peers()
        add = add_neighbors_command(render_config([n2], {}, sp.socket_path, sp.batch))
        assert api.sent == [[add]] and set(sp.loaded) == {p1, p2} and sp.serves(p2)
        assert dict(sp.announced) == {p1: {N("10.1.0.0/24"): RouteAttrs()}}  # p1 untouched

        sp.configure({p2: n2})
        assert await sp._change_peers()
        assert api.sent[-1] == [remove_neighbor_command(p1)] and not sp.serves(p1)
        assert dict(sp.announced) == {}
        assert "neighbor 10.0.0.3 {" in sp.config_path.read_text()
        assert "neighbor 10.0.0.2 {" not in sp.config_path.read_text()

        sp.configure({p2: Neighbor(p2, 1, 2, V4("10.0.0.1"), A("10.0.0.1"), hold_time=9)})
        assert not await sp._change_peers()  # changed settings: only a restart applies them
        assert len(api.sent) == 2 and sp.peer_changes == 2
    asyncio.run(go())


def test_egress_gateway_advertisements_announce_the_host_prefixes_features_hold(tmp_path: Path) -> None:
    cache = ManifestCache(MANIFEST_KINDS)
    cache.sync([
        m("BGPClusterConfig", "c", CC),
        m("BGPPeerConfig", "p", {"families": [
            {"afi": "ipv4", "safi": "unicast", "advertisements": {"matchLabels": {"a": "b"}}}]}),
        m("BGPAdvertisement", "a", {"advertisements": [{"advertisementType": "EgressGateway"}]},
          {"a": "b"})])
    held = resolve(cache, LOCAL, (), tmp_path, ["10.255.0.10/32", "fd00::10/128"])
    assert set(held.routes[A("10.0.0.254")]) == {N("10.255.0.10/32")}  # the peer's family only
    assert resolve(cache, LOCAL, (), tmp_path).routes[A("10.0.0.254")] == {}  # withdrawn


def test_a_host_prefix_carries_its_prepends_on_ebgp_only(tmp_path: Path) -> None:
    cache = ManifestCache(MANIFEST_KINDS)
    peer = {"families": [{"afi": "ipv4", "safi": "unicast", "advertisements": {"matchLabels": {"a": "b"}}}]}
    ads = m("BGPAdvertisement", "a", {"advertisements": [{"advertisementType": "EgressGateway"},
                                                         {"advertisementType": "PodCIDR"}]}, {"a": "b"})
    cache.sync([m("BGPClusterConfig", "c", CC), m("BGPPeerConfig", "p", peer), ads])
    held = resolve(cache, LOCAL, (), tmp_path, ["10.255.0.10/32"], {"10.255.0.10/32": 2})
    routes = held.routes[A("10.0.0.254")]
    assert routes[N("10.255.0.10/32")].as_path == (65001, 65001, 65001)
    assert routes[N("10.1.1.0/24")].as_path == ()  # the pod CIDR keeps the default path
    text = announce_commands(A("10.0.0.254"), [(N("10.255.0.10/32"), routes[N("10.255.0.10/32")])], 10)
    assert text == ["neighbor 10.0.0.254 announce attributes next-hop self as-path [65001 65001 65001] "
                    "nlri 10.255.0.10/32"]
    ibgp = {"bgpInstances": [{"name": "i0", "localASN": 65001, "peers": [
        {"name": "r", "peerAddress": "10.0.0.254", "peerASN": 65001, "peerConfigRef": {"name": "p"}}]}]}
    cache.sync([m("BGPClusterConfig", "c", ibgp), m("BGPPeerConfig", "p", peer), ads])
    held = resolve(cache, LOCAL, (), tmp_path, ["10.255.0.10/32"], {"10.255.0.10/32": 2})
    assert held.routes[A("10.0.0.254")][N("10.255.0.10/32")].as_path == ()  # our AS twice: a loop

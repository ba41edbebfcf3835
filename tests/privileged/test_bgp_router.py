"""The BGP module against real ExaBGP (node netns) and real BIRD 2 (router netns)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bgp.config import BGPConfig
from bgp.module import BGPControlPlane
from clustermesh.models import ClusterService, L4Addr
from clustermesh.tables import SERVICES, services_table
from plexus.commands.bgp import _render_peers
from plexus.core.manifests import MANIFESTS, Manifest, manifests_table
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE, LocalNode
from tests.bgp_lab import NODE_ASN, NODE_IP, ROUTER_ASN, ROUTER_IP, Lab, bgp_lab
from tests.support import eventually

pytestmark = pytest.mark.usefixtures("root")
CLUSTER = "east"


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> Manifest:
    body = {"apiVersion": "plexus.io/v1", "kind": kind,
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec}
    return Manifest(CLUSTER, kind, "default", name, body)


def cluster_config(peer_asn: int = NODE_ASN) -> Manifest:
    return doc("BGPClusterConfig", "main", {
        "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "n1"}},
        "bgpInstances": [{"name": "i0", "localASN": NODE_ASN, "peers": [
            {"name": "router", "peerAddress": ROUTER_IP, "peerASN": peer_asn,
             "peerConfigRef": {"name": "router"}}]}]})


def peer_config(**extra: Any) -> Manifest:
    return doc("BGPPeerConfig", "router", {
        "timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3},
        "gracefulRestart": {"enabled": True, "restartTimeSeconds": 60},
        "families": [{"afi": "ipv4", "safi": "unicast",
                      "advertisements": {"matchLabels": {"advertise": "bgp"}}}], **extra})


ADVERTS = [
    doc("BGPAdvertisement", "pods", {"advertisements": [
        {"advertisementType": "PodCIDR", "attributes": {
            "communities": {"standard": ["65000:100"], "large": ["65001:1:2"]}, "localPreference": 200}},
        {"advertisementType": "Service", "service": {"addresses": ["ClusterIP", "LoadBalancerIP"]},
         "selector": {"matchLabels": {"bgp": "yes"}},
         "attributes": {"communities": {"wellKnown": ["no-export"]}}}]}, {"advertise": "bgp"}),
    doc("BGPAdvertisement", "pods-extra", {"advertisements": [
        {"advertisementType": "PodCIDR", "attributes": {
            "communities": {"standard": ["65000:200"]}, "localPreference": 300}}]}, {"advertise": "bgp"}),
]


def service(name: str, ip: str, **labels: str) -> ClusterService:
    return ClusterService(cluster=CLUSTER, namespace="default", name=name,
                          frontends={ip: {"http": L4Addr("TCP", 80)}},
                          backends={"10.1.1.7": {"http": L4Addr("TCP", 8080)}}, labels=labels)


class Agent:
    def __init__(self, lab: Lab, tmp: Path, local: LocalNode | None = None) -> None:
        class Cfg:
            pass
        self.hive = Hive(agent=Cfg(), state_dir=tmp)
        self.hive.provide(LOCAL_NODE, local or LocalNode(CLUSTER, 1, "n1", NODE_IP, "10.1.1.0/24"))
        self.manifests = self.hive.provide(MANIFESTS, manifests_table())
        self.services = self.hive.provide(SERVICES, services_table())
        cmd = ["ip", "netns", "exec", lab.node_ns, *BGPConfig().exabgp]
        self.bgp = BGPControlPlane(self.hive, BGPConfig(exabgp=cmd, secrets_dir=tmp / "secrets"))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Lab, Agent]]:
    with bgp_lab() as lab:
        agent = Agent(lab, tmp_path)
        try:
            yield lab, agent
        finally:
            await agent.bgp.stop()


async def test_routes_communities_change_withdraw_restart_and_bad_config(env: tuple[Lab, Agent]) -> None:
    lab, agent = env
    lab.start_bird(node_asn=NODE_ASN, router_asn=NODE_ASN)  # iBGP so LOCAL_PREF is carried
    for m in [cluster_config(), peer_config(), *ADVERTS]:
        agent.manifests.upsert(m)
    agent.services.upsert(service("web", "10.96.0.10", bgp="yes",
                                  **{"plexus.io/load-balancer-ip": "192.0.2.10"}))
    agent.services.upsert(service("db", "10.96.0.11"))  # not selected
    await agent.bgp.start()
    await eventually(lab.established, 30, 0.2, "BGP session established")

    def expected_first() -> bool:
        r = lab.routes()
        return set(r) == {"10.1.1.0/24", "10.96.0.10/32", "192.0.2.10/32"}
    await eventually(expected_first, 20, 0.2, "router holds exactly the expected prefixes")
    r = lab.routes()
    assert r["10.1.1.0/24"] == {"communities": "(65000,100) (65000,200)", "large": "(65001, 1, 2)",
                                "local_pref": "300"}
    assert r["10.96.0.10/32"]["communities"] == "(65535,65281)"
    # the routes count as advertised once ExaBGP has taken them for the established session
    await eventually(lambda: agent.bgp.peers()[0]["state"] == "established"
                     and agent.bgp.peers()[0]["advertised"] == 3, 10, 0.05,
                     lambda: f"agent sees the session up with 3 routes sent: {agent.bgp.peers()[0]}")
    adv = {r["prefix"]: r for r in await agent.bgp._advertised({}, None)}
    assert adv["10.1.1.0/24"]["communities"] == ["65000:100", "65000:200"]
    assert adv["10.1.1.0/24"]["localPreference"] == 300
    table = _render_peers(await agent.bgp._peers({}, None))
    assert ROUTER_IP in table and "established" in table

    # a table change shows up; a removal withdraws; changed attributes are re-announced
    agent.services.upsert(service("api", "10.96.0.12", bgp="yes"))
    await eventually(lambda: "10.96.0.12/32" in lab.routes(), 10, 0.1, "new service announced")
    agent.services.delete((CLUSTER, "default", "web"))
    await eventually(lambda: set(lab.routes()) == {"10.1.1.0/24", "10.96.0.12/32"}, 10, 0.1,
                     "removed service withdrawn")
    agent.manifests.delete(ADVERTS[1].key)
    await eventually(lambda: lab.routes().get("10.1.1.0/24", {}).get("local_pref") == "200", 10, 0.1,
                     "pod CIDR re-announced with the remaining advertisement's attributes")

    # an invalid manifest is rejected naming the field; the running config stays
    agent.manifests.upsert(peer_config(timers={"holdTimeSeconds": 2, "keepAliveTimeSeconds": 1}))
    await eventually(lambda: agent.bgp.problems, 5, 0.05, "problem reported")
    problem = next(iter(agent.bgp.problems.values()))
    assert "spec.timers.holdTimeSeconds" in problem and "keeping the last good version" in problem
    assert "bgp:" not in problem
    assert lab.established() and set(lab.routes()) == {"10.1.1.0/24", "10.96.0.12/32"}
    assert agent.bgp.speaker.neighbors[next(iter(agent.bgp.speaker.neighbors))].hold_time == 9

    # ExaBGP dies: restarted with backoff, routes (and session) come back without an agent restart
    proc = agent.bgp.speaker.proc
    assert proc is not None
    old_pid = proc.pid
    proc.kill()
    agent.services.upsert(service("late", "10.96.0.13", bgp="yes"))  # changed while ExaBGP is down
    await eventually(lambda: agent.bgp.speaker.proc is not None and agent.bgp.speaker.proc.pid != old_pid
                     and agent.bgp.speaker.ready(), 20, 0.1, "ExaBGP restarted")
    await eventually(lambda: "Established" in lab.protocol_state() and agent.bgp.peers()[0]["state"]
                     == "established", 30, 0.2, "session re-established")
    await eventually(lambda: set(lab.routes()) == {"10.1.1.0/24", "10.96.0.12/32", "10.96.0.13/32"}, 20,
                     0.2, "routes back after the restart, with the change made meanwhile")
    assert agent.bgp.speaker.restarts == 1

    # drain withdraws everything deliberately
    await agent.bgp._drain({}, None)
    await eventually(lambda: lab.routes() == {}, 10, 0.1, "drained")
    await agent.bgp._undrain({}, None)
    await eventually(lambda: len(lab.routes()) == 3, 10, 0.1, "undrained")


@pytest.mark.parametrize("right", [True, False])
async def test_md5(env: tuple[Lab, Agent], right: bool) -> None:
    lab, agent = env
    lab.start_bird(password="s3cret-pw")
    (agent.hive.state_dir / "secrets").mkdir()
    (agent.hive.state_dir / "secrets" / "router-md5").write_text("s3cret-pw\n" if right else "wrong-pw\n")
    for m in [cluster_config(peer_asn=65000), peer_config(authSecretRef="router-md5"), *ADVERTS]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    assert "s3cret" not in str(agent.bgp.status()) and "s3cret" not in repr(agent.bgp.speaker.neighbors)
    if right:
        await eventually(lab.established, 30, 0.2, "session with the right password")
        await eventually(lambda: "10.1.1.0/24" in lab.routes(), 20, 0.2, "routes over the MD5 session")
        return
    await eventually(lambda: "MD5" in agent.bgp.peers()[0]["reason"], 30, 0.2, "status says why")
    assert not lab.established()
    assert agent.bgp.peers()[0]["state"] != "established"
    await asyncio.sleep(0)


async def test_agent_stop_leaves_routes_drain_removes_them(env: tuple[Lab, Agent]) -> None:
    lab, agent = env
    lab.start_bird()
    for m in [cluster_config(peer_asn=65000), peer_config(), *ADVERTS]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    await eventually(lambda: set(lab.routes()) == {"10.1.1.0/24"}, 30, 0.2, "pod CIDR announced")
    await agent.bgp.stop()
    # The session is gone, yet the router keeps the routes (graceful restart): stop is not remove.
    await eventually(lambda: not lab.established(), 15, 0.1, "session down after stop")
    assert set(lab.routes()) == {"10.1.1.0/24"}

    # A new agent picks up: routes ride in ExaBGP's config; drain then withdraws for real.
    again = Agent(lab, agent.hive.state_dir)
    for m in agent.manifests:
        again.manifests.upsert(m)
    await again.bgp.start()
    try:
        await eventually(lambda: again.bgp.peers()[0]["state"] == "established", 30, 0.2, "session back")
        assert set(lab.routes()) == {"10.1.1.0/24"}
        await again.bgp._drain({}, None)
        await eventually(lambda: lab.routes() == {}, 10, 0.1, "drained")
        assert (agent.hive.state_dir / "bgp" / "drained").exists()  # a drain survives restarts
    finally:
        await again.bgp.stop()


NODE_IP2, ROUTER_IP2 = "10.255.1.1", "10.255.1.2"
SECOND_PEER = f"""
protocol bgp node2 {{
    local {ROUTER_IP2} as {ROUTER_ASN};
    neighbor {NODE_IP2} as {NODE_ASN};
    direct;
    hold time 9;
    connect retry time 1;
    error wait time 1, 2;
    graceful restart on;
    ipv4 {{ import all; export none; }};
}}
"""


def two_peers() -> Manifest:
    """The router over the first subnet (instance i0) and over the second (instance i1)."""
    return doc("BGPClusterConfig", "main", {
        "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "n1"}},
        "bgpInstances": [
            {"name": "i0", "localASN": NODE_ASN, "peers": [
                {"name": "router", "peerAddress": ROUTER_IP, "peerASN": ROUTER_ASN,
                 "peerConfigRef": {"name": "router"}}]},
            {"name": "i1", "localASN": NODE_ASN, "peers": [
                {"name": "router2", "peerAddress": ROUTER_IP2, "peerASN": ROUTER_ASN,
                 "peerConfigRef": {"name": "router"}}]}]})


async def test_adding_and_removing_a_peer_leaves_the_other_session_up(env: tuple[Lab, Agent]) -> None:
    lab, agent = env
    lab.add_link_addresses(f"{NODE_IP2}/30", f"{ROUTER_IP2}/30")
    lab.start_bird(peers=SECOND_PEER)
    override = doc("BGPNodeConfigOverride", "n1",
                   {"bgpInstances": [{"name": "i1", "localAddress": NODE_IP2}]})
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config(), override, *ADVERTS]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    await eventually(lambda: set(lab.routes()) == {"10.1.1.0/24"}, 30, 0.2, "first session with the pod CIDR")
    await eventually(lambda: agent.bgp.peers()[0]["state"] == "established", 10, 0.05, "agent sees it up")
    speaker = agent.bgp.speaker
    assert speaker.proc is not None
    pid, first = speaker.proc.pid, lab.session("node")
    assert first[0] == "Established"

    def first_untouched() -> None:
        assert lab.same_session(first, "node"), "the first session was reset"
        assert speaker.proc is not None and speaker.proc.pid == pid and speaker.restarts == 0
        assert speaker.peers[ipaddress.ip_address(ROUTER_IP)].flaps == 0

    # add a second peer: it comes up with the routes, the first session is not reset
    agent.manifests.upsert(two_peers())
    await eventually(lambda: lab.established("node2") and set(lab.routes("node2")) == {"10.1.1.0/24"},
                     30, 0.2, "second session up with the pod CIDR")
    await eventually(lambda: [p["state"] for p in agent.bgp.peers()] == ["established"] * 2, 10, 0.05,
                     lambda: f"agent sees both sessions up: {agent.bgp.peers()}")
    first_untouched()
    assert speaker.peer_changes == 1

    # both peers get later changes, and the advertised view says so
    agent.services.upsert(service("web", "10.96.0.10", bgp="yes"))
    both = {"10.1.1.0/24", "10.96.0.10/32"}
    await eventually(lambda: set(lab.routes()) == both and set(lab.routes("node2")) == both, 10, 0.1,
                     "a new service announced to both peers")
    adv = await agent.bgp._advertised({}, None)
    assert {(r["peer"], r["prefix"]) for r in adv} == {(p, n) for p in (ROUTER_IP, ROUTER_IP2) for n in both}

    # remove it: its session goes, the first one stays with its routes
    agent.manifests.upsert(cluster_config(peer_asn=ROUTER_ASN))
    await eventually(lambda: not lab.established("node2"), 20, 0.1, "second session closed")
    assert [p["peer"] for p in agent.bgp.peers()] == [ROUTER_IP]
    assert {r["peer"] for r in await agent.bgp._advertised({}, None)} == {ROUTER_IP}
    first_untouched()
    assert speaker.peer_changes == 2
    assert set(lab.routes()) == both

    # and back again: a removed peer can return, with the routes of now
    agent.manifests.upsert(two_peers())
    await eventually(lambda: lab.established("node2"), 30, 0.2, "second session back")
    await eventually(lambda: agent.bgp.peers()[1]["state"] == "established", 30, 0.05, "agent sees it")
    await eventually(lambda: agent.bgp.peers()[1]["advertised"] == 2, 10, 0.05, "its routes advertised")
    first_untouched()
    assert speaker.peer_changes == 3

"""The BGP module with BIRD, FRR and GoBGP as the router: the same checks for each.

One IPv4 session carries IPv4 and IPv6 routes (MP-BGP, IPv6 next hop set per node); every
Service of the node's cluster is eligible; the router holds exactly what the agent says it
sent; withdrawals (across families too) reach it; a session that is down shows nothing as
advertised. And a config ExaBGP refuses leaves the running sessions alone and says why.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bgp.tables import Neighbor
from plexus.core.manifests import Manifest
from plexus.core.node import LocalNode
from tests.bgp_lab import NODE_ASN, NODE_IP, ROUTER_ASN, ROUTER_IP, Lab, bgp_lab
from tests.bgp_routers import (
    NODE_IP6,
    ROUTERS,
    GoBgp,
    Monitor,
    Route,
    Router,
    add_ipv6,
    available,
    start_router,
)
from tests.privileged.test_bgp_router import CLUSTER, Agent, cluster_config, doc
from tests.support import eventually, stop_pid

pytestmark = pytest.mark.usefixtures("root")
LOCAL = LocalNode(CLUSTER, 1, "n1", NODE_IP, "10.1.1.0/24", "fd00:1:1::/64")
# What each router records as LOCAL_PREF for a route learnt over eBGP (none is sent).
EBGP_LOCAL_PREF = {"bird": 100, "frr": None, "gobgp": None}


def peer_config(*families: str) -> Manifest:
    return doc("BGPPeerConfig", "router", {
        "timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3},
        "gracefulRestart": {"enabled": True, "restartTimeSeconds": 60},
        "families": [{"afi": f, "safi": "unicast", "advertisements": {"matchLabels": {"advertise": "bgp"}}}
                     for f in families]})


ADVERTS = doc("BGPAdvertisement", "all", {"advertisements": [
    {"advertisementType": "PodCIDR", "attributes": {
        "communities": {"standard": ["65000:100"], "large": ["65001:1:2"]}, "localPreference": 200}},
    {"advertisementType": "Service", "service": {"addresses": ["ClusterIP", "LoadBalancerIP"]},
     "selector": {"matchLabels": {"bgp": "yes"}},
     "attributes": {"communities": {"wellKnown": ["no-export"]}}}]}, {"advertise": "bgp"})
NEXT_HOP = doc("BGPNodeConfigOverride", "n1", {"bgpInstances": [{"name": "i0", "ipv6NextHop": NODE_IP6}]})


def local_service() -> Manifest:
    """A Service of the node's own cluster, not global: eligible all the same."""
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "labels": {"bgp": "yes"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "loadBalancerIP": "192.0.2.10",
                     "ports": [{"port": 80}]}}
    return Manifest(CLUSTER, "Service", "default", "web", body)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Lab, Agent]]:
    with bgp_lab() as lab:
        add_ipv6(lab)
        agent = Agent(lab, tmp_path, LOCAL)
        try:
            yield lab, agent
        finally:
            await agent.bgp.stop()


def as_sent(row: dict[str, Any], kind: str) -> Route:
    """A row of `plexus bgp routes advertised` as the router should hold it."""
    lp = row["localPreference"]
    return Route(next_hop=row["nextHop"], as_path=tuple(row["asPath"]),
                 local_pref=EBGP_LOCAL_PREF[kind] if lp is None else lp,
                 communities=tuple(row["communities"]), large=tuple(row["largeCommunities"]))


@pytest.mark.parametrize("kind", ROUTERS)
async def test_dual_stack_over_one_ipv4_session_services_withdraw_and_down(
        env: tuple[Lab, Agent], kind: str) -> None:
    if not available(kind):
        pytest.skip(f"{kind} is not installed (scripts/setup.sh installs it)")
    lab, agent = env
    router: Router = start_router(lab, kind)
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config("ipv4", "ipv6"), ADVERTS, NEXT_HOP,
              local_service()]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    await eventually(router.established, 30, 0.2, f"{kind}: session established")

    lp = EBGP_LOCAL_PREF[kind]
    pods = Route(NODE_IP, (NODE_ASN,), lp, ("65000:100",), ("65001:1:2",))
    svc = Route(NODE_IP, (NODE_ASN,), lp, ("65535:65281",))
    want4 = {"10.1.1.0/24": pods, "10.96.0.10/32": svc, "192.0.2.10/32": svc}
    want6 = {"fd00:1:1::/64": dataclasses.replace(pods, next_hop=NODE_IP6)}
    await eventually(lambda: router.routes("ipv4") == want4 and router.routes("ipv6") == want6, 20, 0.2,
                     lambda: f"{kind} holds exactly the IPv4 and IPv6 routes, as sent: "
                             f"{router.routes('ipv4')} {router.routes('ipv6')}")
    assert agent.bgp.problems == {} and agent.bgp.speaker.refused == ""

    # what the agent says it sent is what the router holds: no LOCAL_PREF on eBGP
    # (routes count as advertised once ExaBGP has taken them for the established session)
    held = {**router.routes("ipv4"), **router.routes("ipv6")}

    def sent() -> dict[str, Route]:
        return {r["prefix"]: as_sent(r, kind) for r in agent.bgp.advertised()}

    await eventually(lambda: agent.bgp.peers()[0]["state"] == "established" and sent() == held, 10, 0.05,
                     lambda: f"agent sees it up and says it sent what {kind} holds: {sent()}")
    adv = agent.bgp.advertised()
    assert all(r["localPreference"] is None and "local-preference" not in r["attributes"] for r in adv)

    # withdrawals: the service goes; the IPv6 family goes (its routes carry an IPv6 next hop)
    agent.manifests.delete(local_service().key)
    await eventually(lambda: router.routes("ipv4") == {"10.1.1.0/24": pods}, 10, 0.1,
                     f"{kind}: the service's prefixes withdrawn")
    agent.manifests.upsert(peer_config("ipv4"))
    await eventually(lambda: router.routes("ipv6") == {}, 10, 0.1, f"{kind}: the IPv6 routes withdrawn")
    # a family is a capability of the OPEN: the session is renegotiated (ExaBGP itself is not
    # restarted) and the IPv4 routes, held through graceful restart, stay as they were
    await eventually(lambda: router.established() and router.routes("ipv4") == {"10.1.1.0/24": pods},
                     30, 0.1, lambda: f"{kind}: back up with the IPv4 routes: {router.routes('ipv4')}")
    assert agent.bgp.speaker.restarts == 0

    # the router goes away: nothing shows as advertised to it
    for p in list(lab.procs):
        stop_pid(p)
    lab.stop_bird()
    await eventually(lambda: agent.bgp.peers()[0]["state"] != "established", 20, 0.1, "session down")
    assert agent.bgp.advertised() == [] and agent.bgp.peers()[0]["advertised"] == 0


async def test_a_refused_config_leaves_the_session_up_and_says_why(
        env: tuple[Lab, Agent], caplog: pytest.LogCaptureFixture) -> None:
    lab, agent = env
    router = start_router(lab, "bird")
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config("ipv4", "ipv6"), ADVERTS, NEXT_HOP]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    await eventually(lambda: router.established() and "fd00:1:1::/64" in router.routes("ipv6"), 30, 0.2,
                     "session up with the IPv6 route")
    await eventually(lambda: agent.bgp.peers()[0]["state"] == "established", 10, 0.05, "agent sees it up")
    speaker = agent.bgp.speaker
    assert speaker.proc is not None
    pid, state = speaker.proc.pid, lab.session()
    peer = ipaddress.ip_address(ROUTER_IP)
    good: Neighbor = speaker.neighbors[peer]

    # A setting ExaBGP's parser refuses (manifests cannot say it; the parser is the last word)
    caplog.set_level(logging.INFO, logger="bgp.speaker")
    speaker.configure({peer: dataclasses.replace(good, hold_time=2)})
    await eventually(lambda: speaker.refused, 20, 0.05, "refusal noticed")
    assert "holdtime must be zero or at least 3 seconds" in speaker.refused
    assert "holdtime must be" in agent.bgp.status()["problems"]["ExaBGP"]
    assert "ExaBGP refused the config" in agent.bgp.peers()[0]["reason"]
    assert any("holdtime must be" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    # ExaBGP and the session are as they were
    assert speaker.proc.pid == pid and speaker.proc.returncode is None and speaker.restarts == 0
    assert lab.same_session(state) and agent.bgp.peers()[0]["state"] == "established"
    assert "fd00:1:1::/64" in router.routes("ipv6") and "10.1.1.0/24" in router.routes("ipv4")

    # back to a config it takes: the problem goes, still the same session
    speaker.configure({peer: good})
    await eventually(lambda: not speaker.refused, 10, 0.05, "refusal cleared")
    assert "ExaBGP" not in agent.bgp.status()["problems"] and agent.bgp.peers()[0]["reason"] == ""
    assert speaker.proc.pid == pid and lab.same_session(state)


def saw(monitor: Monitor, since: int, event: tuple[str, bool]) -> bool:
    return event in monitor.events()[since:]


def state(what: str, router: Router, agent: Agent) -> str:
    return (f"{what}; RIB {sorted(router.routes('ipv4'))}, "
            f"advertised {[r['prefix'] for r in agent.bgp.advertised()]}")


async def test_every_withdrawal_reaches_gobgps_rib_monitor(env: tuple[Lab, Agent]) -> None:
    """Announce and withdraw a service in a loop with `gobgp monitor global rib` watching:
    each withdrawal must show there (and so have gone on the wire) within seconds."""
    if not available("gobgp"):
        pytest.skip("gobgp is not installed (scripts/setup.sh installs it)")
    lab, agent = env
    router = start_router(lab, "gobgp")
    assert isinstance(router, GoBgp)
    for m in [cluster_config(peer_asn=ROUTER_ASN), peer_config("ipv4"), ADVERTS]:
        agent.manifests.upsert(m)
    await agent.bgp.start()
    await eventually(lambda: "10.1.1.0/24" in router.routes("ipv4"), 30, 0.2, "session up with the pod CIDR")
    monitor = router.monitor("ipv4")
    await eventually(partial(saw, monitor, 0, ("10.1.1.0/24", False)), 20, 0.05,
                     "the monitor is subscribed (it lists the RIB first)")
    for i in range(10):
        seen = len(monitor.events())
        agent.manifests.upsert(local_service())
        await eventually(partial(saw, monitor, seen, ("192.0.2.10/32", False)), 10, 0.02,
                         f"announcement {i} in the monitor")
        seen = len(monitor.events())
        agent.manifests.delete(local_service().key)
        await eventually(partial(saw, monitor, seen, ("192.0.2.10/32", True)), 10, 0.02,
                         partial(state, f"withdrawal {i} in the monitor", router, agent))
    assert set(router.routes("ipv4")) == {"10.1.1.0/24"}

"""Processes die and paths break under traffic: connections live on, state is kept, and
what changed meanwhile arrives everywhere once the fault is gone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns
from tests.chaos.faults import (
    child,
    endpoint_ips,
    kill,
    partitioned,
    pid_of,
    probing,
    ready,
)
from tests.support import wait_until, whoami, whoami_server

PORT = 7100
MAX_UDP_LOSS = 0.05  # of the datagrams sent while the fault lasts


@contextmanager
def pods(lab: Lab, *specs: tuple[str, str, str]) -> Iterator[dict[str, str]]:
    """Pods (cluster, node, name), each serving whoami on PORT over TCP and UDP; their IPs
    by name. Deleted afterwards."""
    ips: dict[str, str] = {}
    with ExitStack() as stack:
        for cluster, node, name in specs:
            ips[name] = lab.pod_add(cluster, node, name, {"app": "chaos"})["ip"]
            stack.callback(lab.pod_del, cluster, node, name)
            ns = pod_netns(lab.topo.node(cluster, node), name)
            for proto in ("tcp", "udp"):
                stack.enter_context(whoami_server(ns, proto, PORT, name))
        yield ips


def reaches(ns: str, ip: str, name: str) -> None:
    wait_until(lambda: whoami(ns, "tcp", ip, PORT, timeout=1) == [[name]], 30, interval=0.3,
               what=f"{ns} reaches {name} ({ip})")


def held(counts: dict[str, Any], what: str) -> None:
    """The TCP connection lived through it and lost nothing; UDP lost little."""
    assert not counts["tcp_error"] and counts["tcp_echoed"] == counts["tcp_sent"] > 0, (what, counts)
    lost = 1 - counts["udp_answered"] / max(counts["udp_sent"], 1)
    assert counts["udp_sent"] >= 10 and lost <= MAX_UDP_LOSS, (what, f"udp loss {lost:.1%}", counts)


def test_agent_killed_under_traffic_loses_no_connection_and_no_state(lab: Lab) -> None:
    with pods(lab, ("east", "n1", "ak-client"), ("east", "n2", "ak-near"),
              ("west", "n1", "ak-far")) as ips:
        client = pod_netns(lab.topo.node("east", "n1"), "ak-client")
        reaches(client, ips["ak-near"], "ak-near")
        reaches(client, ips["ak-far"], "ak-far")
        east_n1, west_n1 = lab.topo.node("east", "n1"), lab.topo.node("west", "n1")
        with probing(client, ips["ak-near"], PORT) as near, probing(client, ips["ak-far"], PORT) as far:
            killed = kill(lab, "agent-east-n1")
            lab.up()  # what an operator (or a supervisor) does: the agent starts again
            assert pid_of(lab, "agent-east-n1") != killed
            time.sleep(1)  # traffic keeps flowing a little after the restart, still counted
            counts = {"near": near.stop(), "far": far.stop()}
        for what, c in counts.items():
            held(c, f"east-n1 -> {what} across the agent's kill -9 and restart")
        # The restarted agent knows its pod and the remote ones; the others still know its pod.
        assert ips["ak-client"] in endpoint_ips(lab, east_n1, "east")
        assert ips["ak-far"] in endpoint_ips(lab, east_n1, "west")
        assert ips["ak-client"] in endpoint_ips(lab, west_n1, "east")
        assert all(ready(lab, east_n1).values())


def test_exabgp_killed_graceful_restart_holds_the_routes(lab: Lab) -> None:
    node = lab.topo.node("east", "n1")
    session = lab.bgp_protocol(node)

    def established() -> bool:
        return any(line.split()[:1] == [session] and line.rstrip().endswith("Established")
                   for line in lab.birdc("show", "protocols").splitlines())

    with pods(lab, ("east", "n1", "gr-east"), ("west", "n2", "gr-west")) as ips:
        src = pod_netns(lab.topo.node("west", "n2"), "gr-west")
        reaches(src, ips["gr-east"], "gr-east")  # west -> east-n1's pods: the router's BGP route
        speaker = child(pid_of(lab, "agent-east-n1"), "bgp/launcher.py")
        assert speaker is not None and established()
        samples: list[tuple[bool, bool]] = []  # (session up, route on the router)
        with probing(src, ips["gr-east"], PORT) as probe:
            os.kill(speaker, signal.SIGKILL)  # a child of the agent the lab recorded: ours

            def back() -> bool:
                samples.append((established(), node.pod_cidr in lab.birdc("show", "route", node.pod_cidr)))
                fresh = child(pid_of(lab, "agent-east-n1"), "bgp/launcher.py")
                return samples[-1][0] and fresh not in (None, speaker) and any(not up for up, _ in samples)

            wait_until(back, 60, interval=0.1, what="the session to drop and come back with a new ExaBGP")
            counts = probe.stop()
        assert all(route for _, route in samples), f"the router lost {node.pod_cidr}: {samples}"
        held(counts, "west-n2 -> east-n1 across ExaBGP's kill -9")
        assert f"[{session} " in lab.birdc("show", "route", node.pod_cidr)


def test_etcd_killed_then_partitioned_state_kept_and_stale_removed_after_heal(lab: Lab) -> None:
    west = lab.topo.cluster("west")
    assert len(west.etcd) == 1
    east_n1, east_n2, west_n1 = (lab.topo.node("east", "n1"), lab.topo.node("east", "n2"),
                                 lab.topo.node("west", "n1"))
    with pods(lab, ("east", "n2", "ek-client"), ("west", "n1", "ek-far")) as ips:
        client = pod_netns(east_n2, "ek-client")
        reaches(client, ips["ek-far"], "ek-far")
        before = {n.key: endpoint_ips(lab, n, "west") for n in (east_n1, west_n1)}
        assert all(ips["ek-far"] in v for v in before.values())

        # The cluster's only etcd dies: agents notice, keep what they know, traffic flows.
        with probing(client, ips["ek-far"], PORT) as probe:
            kill(lab, "etcd-west")
            wait_until(lambda: not ready(lab, east_n1).get("west", True), 30,
                       what="east-n1 notices west's etcd is gone")
            assert {n.key: endpoint_ips(lab, n, "west") for n in (east_n1, west_n1)} == before
            lab.up()
            wait_until(lambda: all(ready(lab, n).get("west") for n in lab.topo.nodes()), 60,
                       what="every agent ready with west again")
            counts = probe.stop()
        held(counts, "east-n2 -> west-n1 while west's etcd was down")
        assert {n.key: endpoint_ips(lab, n, "west") for n in (east_n1, west_n1)} == before

        # west's etcd cut from east-n1 alone: changes meanwhile reach everyone else at once,
        # east-n1 keeps its (stale) view, and after the heal the stale entry goes.
        lab.pod_add("west", "n2", "ek-gone", {"app": "chaos"})
        gone = lab.pods()[pod_netns(lab.topo.node("west", "n2"), "ek-gone")]["ip"]
        wait_until(lambda: gone in endpoint_ips(lab, east_n1, "west"), 30, what="ek-gone everywhere")
        try:
            with partitioned(east_n1.host.netns, west.control_plane.ip):
                wait_until(lambda: not ready(lab, east_n1).get("west", True), 30,
                           what="east-n1 notices the partition")
                lab.pod_del("west", "n2", "ek-gone")
                new = lab.pod_add("west", "n2", "ek-new", {"app": "chaos"})["ip"]
                wait_until(lambda: gone not in endpoint_ips(lab, east_n2, "west")
                           and new in endpoint_ips(lab, east_n2, "west"), 30,
                           what="east-n2 (not cut off) sees the delete and the add")
                assert gone in endpoint_ips(lab, east_n1, "west")  # kept, not drained
                assert new not in endpoint_ips(lab, east_n1, "west")
            wait_until(lambda: ready(lab, east_n1).get("west"), 60, what="east-n1 ready after the heal")
            wait_until(lambda: gone not in endpoint_ips(lab, east_n1, "west")
                       and new in endpoint_ips(lab, east_n1, "west"), 30,
                       what="after the heal the stale entry is gone and the new one is there")
            assert ips["ek-far"] in endpoint_ips(lab, east_n1, "west")
        finally:
            lab.pod_del("west", "n2", "ek-new")



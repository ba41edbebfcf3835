"""A 3-member etcd (east, `plexus lab up --etcd-members 3`): one member lost goes unnoticed;
two lost is a cluster not ready everywhere, with nothing forgotten, until one returns."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from clustermesh.pki import REMOTE_PORT
from plexus.lab import ops
from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns
from tests.chaos.faults import endpoint_ips, kill, plexus, ready
from tests.support import wait_until


@contextmanager
def watching_readiness(lab: Lab, cluster: str) -> Iterator[list[str]]:
    """Every agent's view of `cluster`, sampled until the block ends: who saw it not ready."""
    lapses: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for n in lab.topo.nodes():
                if not ready(lab, n).get(cluster, False):
                    lapses.append(n.key)
            done.wait(0.3)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield lapses
    finally:
        done.set()
        t.join(10)


def test_the_lab_keeps_its_member_count_and_refuses_to_switch_it(lab: Lab) -> None:
    east = Lab().topo.cluster("east")  # as `plexus lab ...` sees the running lab
    assert [m.ip for m in east.etcd] == ["172.31.1.250", "172.31.1.251", "172.31.1.252"]
    assert Lab().topo.cluster("west").etcd_members == 1
    r = plexus("lab", "up", "--etcd-members", "1")
    assert r.returncode == 1 and "runs 3 etcd member(s)" in r.stderr and "lab down" in r.stderr, r.stderr
    st = json.loads(plexus("lab", "status", "-o", "json").stdout)
    assert [(m["name"], m["alive"]) for m in st["etcd"]["east"]] == [
        ("east-0", True), ("east-1", True), ("east-2", True)]
    assert sorted(m["role"] for m in st["etcd"]["east"]) == ["follower", "follower", "leader"]
    # Agents and remotes are given every member.
    agent = (lab.node_dir(lab.topo.node("west", "n1")) / "clustermesh" / "east").read_text()
    assert all(f"https://{m.ip}:{REMOTE_PORT}" in agent for m in east.etcd)


def test_one_member_lost_goes_unnoticed(lab: Lab) -> None:
    west_n1, east_n1 = lab.topo.node("west", "n1"), lab.topo.node("east", "n1")
    with watching_readiness(lab, "east") as lapses:
        # The first member: the one every client is connected to, and the one on loopback.
        kill(lab, "etcd-east-0")
        pod = lab.pod_add("east", "n2", "m1-new", {"app": "chaos"})
        try:
            wait_until(lambda: all(pod["ip"] in endpoint_ips(lab, n, "east")
                                   for n in lab.topo.nodes()), 30,
                       what="a pod added with a member down reaches every agent")
        finally:
            lab.pod_del("east", "n2", "m1-new")
        wait_until(lambda: pod["ip"] not in endpoint_ips(lab, west_n1, "east"), 30,
                   what="its deletion too")
        st = json.loads(plexus("lab", "status", "-o", "json").stdout)
        assert [m["alive"] for m in st["etcd"]["east"]] == [False, True, True]
    assert not lapses, f"east was not ready for a moment on {sorted(set(lapses))}"
    assert ready(lab, east_n1)["east"] and ready(lab, west_n1)["east"]


def test_two_members_lost_is_not_ready_until_one_returns(lab: Lab) -> None:
    west_n1, east_n1 = lab.topo.node("west", "n1"), lab.topo.node("east", "n1")
    pod = lab.pod_add("east", "n1", "m2-pod", {"app": "chaos"})
    try:
        wait_until(lambda: pod["ip"] in endpoint_ips(lab, west_n1, "east"), 30, what="pod known")
        before = endpoint_ips(lab, west_n1, "east")
        kill(lab, "etcd-east-0")
        kill(lab, "etcd-east-1")
        wait_until(lambda: not any(ready(lab, n).get("east", True) for n in lab.topo.nodes()), 60,
                   what="every agent, east's and west's, shows east not ready (quorum lost)")
        r = plexus("clustermesh", "status", "--node", "east-n2", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["clusters"]["east"]["ready"] is False
        # Not ready is not forgotten: what west knew of east is all still there.
        assert endpoint_ips(lab, west_n1, "east") == before
        # Pods keep talking meanwhile: the datapath does not need etcd.
        src = pod_netns(lab.topo.node("west", "n1"), "m2-src")
        lab.pod_add("west", "n1", "m2-src", {"app": "chaos"})
        try:
            wait_until(lambda: ops.run("ping", "-c", "1", "-W", "1", pod["ip"], ns=src,
                                       check=False).returncode == 0, 20, what="west reaches east's pod")
        finally:
            lab.pod_del("west", "n1", "m2-src")

        lab.start("etcd-east-1")  # one member back: a quorum of two
        wait_until(lambda: all(ready(lab, n).get("east") for n in lab.topo.nodes()), 90,
                   what="east ready again on every agent")
        assert endpoint_ips(lab, west_n1, "east") == before
        assert ready(lab, east_n1)["west"]
    finally:
        lab.pod_del("east", "n1", "m2-pod")

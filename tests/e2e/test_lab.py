"""The whole lab: up, up again, pods talk, status, down leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.commands.common import LAB_DIR
from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import pod_netns

ROOT = Path(__file__).resolve().parents[2]


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def lab_namespaces() -> set[str]:
    lab = Lab()
    return {ns for ns in ops.namespaces() if ns.startswith("plx-") and
            (ns in lab.topo.namespaces() or any(ns.startswith(f"plx-{n.key}-") for n in lab.topo.nodes()))}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if lab_namespaces():
        pytest.fail("a lab is already up on this machine; run `plexus lab down` first")
    r = plexus("lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield Lab(say=lambda _line: None)
    finally:
        plexus("lab", "down")


def test_up_again_is_harmless_and_keeps_the_same_processes(lab: Lab) -> None:
    before = {k: p.pid for k, p in State.load(lab.state_path).processes.items()}
    r = plexus("lab", "up")
    assert r.returncode == 0, r.stderr
    after = {k: p.pid for k, p in State.load(lab.state_path).processes.items()}
    assert before == after
    assert len(after) == 1 + 2 + 2 + 4  # BIRD, two etcds, two apiservers, four agents


def test_status_shows_everything_alive(lab: Lab) -> None:
    r = plexus("lab", "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert all(s["namespaces"].values())
    assert all(p["alive"] for p in s["processes"].values())
    for node, st in s["agents"].items():
        assert st.get("node") == node.split("-")[1], st
    assert "10.2.1.0/24" in s["router_routes"]


def test_every_node_reaches_its_cluster_etcd(lab: Lab) -> None:
    for c in lab.topo.clusters:
        for n in c.nodes:
            assert lab.etcd_healthy(n.host.netns, c), n.key


def test_pods_reach_each_other_on_a_node_across_nodes_and_clusters(lab: Lab) -> None:
    web = lab.pod_add("east", "n1", "web", {"app": "web"})
    client = lab.pod_add("east", "n1", "client", {"app": "client"})
    near = lab.pod_add("east", "n2", "cache", {"app": "cache"})
    far = lab.pod_add("west", "n2", "db", {"app": "db"})
    src = pod_netns(lab.topo.node("east", "n1"), "client")
    # Same node; other node of the cluster; other cluster through the router's static routes.
    for ip in (web["ip"], near["ip"], far["ip"]):
        ops.run("ping", "-c", "1", "-W", "2", ip, ns=src)
    ops.run("ping", "-c", "1", "-W", "2", client["ip"], ns=pod_netns(lab.topo.node("west", "n2"), "db"))
    assert client["ip"] != web["ip"]
    # The CLI shows the pods and the agent has registered them.
    r = plexus("status", "--node", "east-n1", "-o", "json")
    assert json.loads(r.stdout)["modules"]["endpoints"]["endpoints"] == 2
    r = plexus("lab", "pod", "del", "east", "n1", "web")
    assert r.returncode == 0, r.stderr
    assert pod_netns(lab.topo.node("east", "n1"), "web") not in ops.namespaces()


def test_clustermesh_connects_the_clusters(lab: Lab) -> None:
    r = plexus("clustermesh", "status", "--node", "east-n1", "-o", "json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert {n: c["ready"] for n, c in st["clusters"].items()} == {"east": True, "west": True}
    assert st["clusters"]["west"]["clusterID"] == 2

    far = lab.pod_add("west", "n1", "api", {"app": "api"})

    def east_sees_it() -> dict[str, object] | None:
        out = plexus("clustermesh", "list", "endpoints", "--node", "east-n2", "--cluster", "west",
                     "-o", "json")
        rows = [e for e in json.loads(out.stdout) if e["ip"] == far["ip"]]
        return rows[0] if rows else None

    from tests.support import wait_until

    entry = wait_until(east_sees_it, 20, what="west pod in east's ipcache")
    assert 2 << 16 <= int(entry["identity"]) < 3 << 16  # west's identity range
    assert entry["host_ip"] == "172.31.2.11"
    # Direct routes between the nodes of one cluster, owned by the agent.
    routes = ops.run("ip", "route", "show", "proto", "190", ns="plx-east-n1").stdout
    assert "10.1.2.0/24 via 172.31.1.12" in routes

    # A global service applied in both clusters merges backends from both.
    lab.pod_add("east", "n2", "web", {"app": "web"})
    lab.pod_add("west", "n2", "web", {"app": "web"})
    for cluster in ("east", "west"):
        r = plexus("apply", "-f", str(ROOT / "examples" / "global-service.yaml"), "--lab", cluster)
        assert r.returncode == 0, r.stderr

    def merged() -> set[str]:
        out = plexus("clustermesh", "list", "global-services", "--node", "east-n1", "-o", "json")
        rows = json.loads(out.stdout)
        return {b["cluster"] for r in rows for b in r["backends"]} if rows else set()

    wait_until(lambda: merged() == {"east", "west"}, 20, what="global service backends")


def test_bad_pod_requests_are_refused(lab: Lab) -> None:
    r = plexus("lab", "pod", "add", "east", "n9", "web")
    assert r.returncode == 1 and "no lab node east n9" in r.stderr
    r = plexus("lab", "pod", "add", "east", "n1", "Bad_Name")
    assert r.returncode == 1 and "pod name" in r.stderr


def test_root_namespace_gets_no_lab_address_or_route(lab: Lab) -> None:
    addrs = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    for net in ("172.31.", "198.51.100.", "10.1.", "10.2."):
        assert net not in addrs and net not in routes


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_zz_down_leaves_nothing(lab: Lab) -> None:
    state = State.load(lab.state_path)
    pids = [(p.pid, p.marker) for p in state.processes.values()]
    children = ops.descendants(pid for pid, _ in pids)
    lab_links = ({h.router_link for h in lab.topo.hosts()} | {s.bridge for s in lab.topo.segments}
                 | {n.wg_device for n in lab.topo.nodes()})
    links_before = root_links()
    assert not lab_links & links_before  # nothing of the lab was ever in the root namespace
    bystander = "plx-tcbystander"  # not the lab's: down must leave it alone
    ops.run("ip", "netns", "add", bystander)
    try:
        r = plexus("lab", "down")
        assert r.returncode == 0, r.stderr
        assert bystander in ops.namespaces()
    finally:
        ops.delete_netns(bystander)
    assert lab_namespaces() == set()
    assert not any(ops.alive(pid, marker) for pid, marker in pids)
    assert not [pid for pid, t in children if ops.running(pid) and ops.start_time(pid) == t]
    assert not lab_links & root_links()
    assert root_links() <= links_before  # down made no link anywhere we can see
    assert not [n.wg_device for n in lab.topo.nodes()
                if Path(f"/var/run/wireguard/{n.wg_device}.sock").exists()]
    assert not LAB_DIR.exists()
    assert not Path("/sys/fs/bpf/plexus-lab").exists()
    # down again is harmless
    assert plexus("lab", "down").returncode == 0

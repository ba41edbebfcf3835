"""The lab in kvstoremesh mode (`plexus lab up --kvstoremesh`): a kvstoremesh next to each
cluster's apiserver copies the other cluster into its etcd, and every agent reads the whole
mesh over one etcd connection. The mesh's behaviour is the direct mode's: the same tests
of connectivity, policy and global services run here against this lab."""

from __future__ import annotations

import json
from pathlib import Path

from clustermesh.pki import REMOTE_PORT
from plexus.lab import ops
from plexus.lab.lab import Lab
from tests.e2e import test_lab as direct
from tests.e2e.labs import plexus
from tests.support import wait_until

MESH_MODE = "kvstoremesh"  # read by the `lab` fixture (tests/e2e/conftest.py)


def test_up_again_is_harmless_and_keeps_the_same_processes(lab: Lab) -> None:
    direct.test_up_again_is_harmless_and_keeps_the_same_processes(lab)


def etcd_connections(netns: str) -> list[str]:
    """Peers of the established TCP connections from `netns` to an etcd port."""
    out = ops.run("ss", "-Htn", "state", "established", ns=netns).stdout
    peers = [line.split()[-1] for line in out.splitlines() if line.strip()]
    # an IPv4 peer of a dual-stack socket shows as [::ffff:a.b.c.d]:port
    return [p.replace("[::ffff:", "").replace("]", "") for p in peers
            if p.endswith((":2379", f":{REMOTE_PORT}"))]


def test_each_agent_reads_every_cluster_over_one_etcd_connection(lab: Lab) -> None:
    for c in lab.topo.clusters:
        for n in c.nodes:
            assert etcd_connections(n.host.netns) == [f"{c.control_plane.ip}:2379"], n.key
            st = json.loads(plexus("clustermesh", "status", "--node", n.key, "-o", "json").stdout)
            other = next(o for o in lab.topo.clusters if o != c)
            remote = st["clusters"][other.name]
            # status stays per cluster: ready, its id, what it holds, its failures
            assert remote["ready"] and remote["clusterID"] == other.id, remote
            assert remote["nodes"] >= len(other.nodes), remote  # and east's the VM
            assert remote["failures"] == 0, remote
    table = plexus("clustermesh", "status", "--node", "east-n1").stdout
    assert "west" in table and "east" in table


def test_kvstoremesh_copies_the_other_cluster_in_ciliums_layout(lab: Lab) -> None:
    for c in lab.topo.clusters:
        other = next(o for o in lab.topo.clusters if o != c)
        st = lab.kvstoremesh_status(c)
        assert st is not None and st["modules"]["kvstoremesh"]["ready"], st
        copy = st["modules"]["kvstoremesh"]["clusters"][other.name]
        assert copy["ready"] and copy["connected"] and sum(copy["entries"].values()) > 0, copy
        keys = lab.etcdctl(c.control_plane.netns, c, "get", "--prefix", "--keys-only",
                           f"cilium/cache/nodes/v1/{other.name}/", check=True).stdout.split()
        # every node of the other cluster (and east's enrolled VM, a node too)
        assert set(keys) >= {f"cilium/cache/nodes/v1/{other.name}/{n.name}" for n in other.nodes}
        canaries = lab.etcdctl(c.control_plane.netns, c, "get", "--prefix", "--keys-only",
                               f"cilium/synced/{other.name}/cilium/cache/", check=True).stdout
        assert f"cilium/synced/{other.name}/cilium/cache/nodes/v1" in canaries
    r = plexus("lab", "status", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["meshMode"] == "kvstoremesh" and set(s["kvstoremesh"]) == {"east", "west"}
    assert {"kvstoremesh-east", "kvstoremesh-west"} <= set(s["processes"])
    text = plexus("lab", "status").stdout
    assert "clustermesh mode: kvstoremesh" in text and "KVSTOREMESH OF" in text


def test_switching_a_running_lab_to_direct_is_refused_and_a_new_remote_pod_arrives(lab: Lab) -> None:
    from plexus.lab.ops import LabError

    try:
        Lab(say=lambda _line: None).up(mesh_mode="direct")
        raise AssertionError("a running kvstoremesh lab was switched to direct")
    except LabError as e:
        assert "`plexus lab down` first" in str(e)
    far = lab.pod_add("west", "n2", "kvpod", {"app": "kvpod"})

    def copied_and_seen() -> bool:
        rows = json.loads(plexus("clustermesh", "list", "endpoints", "--node", "east-n1",
                                 "--cluster", "west", "-o", "json").stdout)
        return any(r["ip"] == far["ip"] for r in rows)

    wait_until(copied_and_seen, 20, what="west's new pod copied by kvstoremesh and seen by east-n1")


def test_pods_reach_each_other_on_a_node_across_nodes_and_clusters(lab: Lab) -> None:
    direct.test_pods_reach_each_other_on_a_node_across_nodes_and_clusters(lab)


def test_clustermesh_connects_the_clusters(lab: Lab) -> None:
    direct.test_clustermesh_connects_the_clusters(lab)


def test_cross_cluster_policy_in_ebpf(lab: Lab, tmp_path: Path) -> None:
    direct.test_cross_cluster_policy_in_ebpf(lab, tmp_path)


def test_global_service_load_balancing_in_ebpf(lab: Lab, tmp_path: Path) -> None:
    direct.test_global_service_load_balancing_in_ebpf(lab, tmp_path)


def test_a_cilium_cluster_and_a_plexus_cluster_share_a_global_service(lab: Lab, tmp_path: Path) -> None:
    """West's apiserver replaced by a writer of Cilium's values: they reach east through
    east's kvstoremesh, and kvstoremesh's copy of east in west's etcd, which the writer leaves
    alone as Cilium's apiserver would, keeps west's agents ready (the lab up at its end waits
    for every node to be ready)."""
    direct.test_a_cilium_cluster_and_a_plexus_cluster_share_a_global_service(lab, tmp_path)


def test_zz_down_leaves_nothing(lab: Lab) -> None:
    direct.test_zz_down_leaves_nothing(lab)

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

from bpf.module import module as bpf
from clustermesh.module import module as clustermesh
from plexus.agent import load_config
from plexus.app import MODULES
from plexus.lab.lab import Lab
from plexus.lab.topology import ROUTER, default, is_lab_netns, pod_netns


def test_every_host_sits_in_its_segment_and_addresses_are_unique() -> None:
    topo = default()
    ips = [h.ip for h in topo.hosts()] + [s.gateway for s in topo.segments]
    assert len(ips) == len(set(ips))
    for h in topo.hosts():
        assert ipaddress.ip_address(h.ip) in ipaddress.ip_network(h.segment.subnet)


def test_pod_cidrs_do_not_overlap_each_other_or_segments() -> None:
    topo = default()
    nets = [ipaddress.ip_network(n.pod_cidr) for n in topo.nodes()]
    nets += [ipaddress.ip_network(s.subnet) for s in topo.segments]
    nets += [ipaddress.ip_network(c.service_cidr) for c in topo.clusters]
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_link_names_fit_the_kernel_limit() -> None:
    topo = default()
    names = [h.router_link for h in topo.hosts()] + [s.bridge for s in topo.segments]
    assert all(len(n) <= 15 for n in names)
    assert len(names) == len(set(names))


def test_lab_namespaces_are_recognised_and_others_are_not() -> None:
    topo = default()
    node = topo.node("east", "n1")
    assert is_lab_netns(ROUTER, topo)
    assert is_lab_netns(pod_netns(node, "web"), topo)
    assert not is_lab_netns("plx-tc1234", topo)  # a test's namespace
    assert not is_lab_netns("other", topo)


def test_design_addresses() -> None:
    topo = default()
    east = topo.cluster("east")
    assert east.control_plane.ip == "172.31.1.250" and east.id == 1
    assert [n.pod_cidr for n in east.nodes] == ["10.1.1.0/24", "10.1.2.0/24"]
    assert topo.vms[0].ip == "172.31.3.10"
    assert topo.external[0].ip == "198.51.100.10"


def test_per_node_device_names_are_unique_and_fit() -> None:
    topo = default()
    devices = [n.wg_device for n in topo.nodes()]
    assert devices == ["plxwg-e1", "plxwg-e2", "plxwg-w1", "plxwg-w2"]
    assert all(len(d) <= 15 for d in devices)


def test_every_agent_config_is_valid_for_the_real_agent(tmp_path: Path) -> None:
    lab = Lab(root=tmp_path)
    for n in lab.topo.nodes():
        path = tmp_path / f"{n.key}.yaml"
        path.write_text(lab.agent_config(n))
        cfg = load_config(path, MODULES)
        assert (cfg.cluster.name, cfg.node.name, str(cfg.node.ip)) == (n.cluster, n.name, n.host.ip)
        assert cfg.api_socket == tmp_path / "nodes" / n.key / "agent.sock"
        assert cfg.metrics.address == n.host.ip  # on the node's own address, not loopback
        etcd = lab.topo.cluster(n.cluster).control_plane.ip
        assert cfg.section(clustermesh).etcd.endpoints == [f"https://{etcd}:2379"]
        assert cfg.section(bpf).pin_dir == tmp_path / "bpffs" / n.key  # on the lab's own bpffs


def test_router_peers_with_every_node_and_takes_pod_cidrs_from_bgp_only() -> None:
    lab = Lab(root=Path("/nonexistent"))
    conf = lab.bird_config()
    for n in lab.topo.nodes():
        assert f"neighbor {n.host.ip} as {n.asn};" in conf
    assert "protocol static" not in conf
    assert "protocol kernel" in conf
    # what each cluster applies is valid for the real manifest models
    from plexus.apply import load_documents

    for c in lab.topo.clusters:
        f = Path(tempfile.mkdtemp()) / "bgp.yaml"
        f.write_text(lab.bgp_manifests(c))
        kinds = sorted(d.kind for d in load_documents([f]))
        assert kinds == ["BGPAdvertisement", "BGPClusterConfig", "BGPPeerConfig"]



def test_etcd_members_get_their_own_addresses_names_and_endpoints() -> None:
    import pytest

    from plexus.lab.topology import with_etcd_members

    one = default().cluster("east")
    assert [(m.name, m.ip, m.process) for m in one.etcd] == [("east", "172.31.1.250", "etcd-east")]
    assert one.etcd_urls == [one.etcd_url]
    topo = default(3)
    east = topo.cluster("east")
    assert [(m.name, m.ip, m.process) for m in east.etcd] == [
        ("east-0", "172.31.1.250", "etcd-east-0"), ("east-1", "172.31.1.251", "etcd-east-1"),
        ("east-2", "172.31.1.252", "etcd-east-2")]
    assert east.etcd_url == "https://172.31.1.250:2379"
    hosts = {h.ip for h in topo.hosts()} - {east.control_plane.ip}
    assert not hosts & {m.ip for m in east.etcd}
    mixed = with_etcd_members(default(), {"west": 5})
    assert [len(c.etcd) for c in mixed.clusters] == [1, 5]
    for bad in (2, 4, 7):
        with pytest.raises(ValueError, match="etcd members"):
            with_etcd_members(default(), bad)
    with pytest.raises(KeyError):
        with_etcd_members(default(), {"north": 3})


def test_agents_and_the_apiserver_are_given_every_member() -> None:
    import yaml

    with tempfile.TemporaryDirectory() as d:
        lab = Lab(default(3), root=Path(d))
        east = lab.topo.cluster("east")
        cfg = yaml.safe_load(lab.agent_config(lab.topo.node("east", "n2")))
        assert cfg["clustermesh"]["etcd"]["endpoints"] == [
            "https://172.31.1.250:2379", "https://172.31.1.251:2379", "https://172.31.1.252:2379"]
        argv = lab._apiserver_argv(east)
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--etcd"] == east.etcd_urls
        names = [d.name for d in lab.control_plane(east)]
        assert names == ["etcd-east-0", "etcd-east-1", "etcd-east-2", "apiserver-east",
                         "remote-endpoint-east"]
        argv = lab._remote_endpoint_argv(east)
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--etcd"] == east.etcd_urls
        single = Lab(root=Path(d) / "one")
        argv = single._apiserver_argv(single.topo.cluster("west"))
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--etcd"] == ["https://127.0.0.1:2379"]


def test_kvstoremesh_mode_runs_one_per_cluster_and_agents_only_name_the_remotes(tmp_path: Path) -> None:
    import pytest
    import yaml

    from clustermesh.pki import make_cluster_pki
    from plexus.lab.lab import State
    from plexus.lab.ops import LabError

    direct = Lab(root=tmp_path / "direct")
    assert not direct.kvstoremesh
    assert "mode" not in yaml.safe_load(direct.agent_config(direct.topo.nodes()[0]))["clustermesh"]
    assert not any(d.name.startswith("kvstoremesh") for d in direct.control_plane(direct.topo.clusters[0]))

    lab = Lab(root=tmp_path / "km")
    lab._set_mesh_mode(State(), "kvstoremesh")
    with pytest.raises(LabError, match="one of direct, kvstoremesh"):
        lab._set_mesh_mode(State(), "both")
    east = lab.topo.cluster("east")
    assert [d.name for d in lab.control_plane(east)][-1] == "kvstoremesh-east"
    argv = lab._kvstoremesh_argv(east)
    assert argv[argv.index("--config-dir") + 1] == str(lab.kvstoremesh_dir(east) / "clustermesh")
    for n in lab.topo.nodes():
        path = tmp_path / f"{n.key}.yaml"
        path.write_text(lab.agent_config(n))
        assert load_config(path, MODULES).section(clustermesh).mode == "kvstoremesh"
    for c in lab.topo.clusters:
        make_cluster_pki(c.name, lab.pki(c.name), [c.control_plane.ip], advertise=[c.control_plane.ip])
    lab._connect_clusters()
    # kvstoremesh has what reaches the other cluster; the agents only its name.
    remote = yaml.safe_load((lab.kvstoremesh_dir(east) / "clustermesh" / "west").read_text())
    assert remote["endpoints"]
    node_dir = lab.node_dir(lab.topo.node("east", "n1")) / "clustermesh"
    assert sorted(p.name for p in node_dir.iterdir()) == ["west"]
    assert (node_dir / "west").read_text() == ""
    # the recorded mode is the lab's until it is down
    State(mesh_mode="kvstoremesh").save(lab.state_path)
    assert Lab(root=lab.root).kvstoremesh

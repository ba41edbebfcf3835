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


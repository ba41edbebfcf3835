from __future__ import annotations

import ipaddress

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

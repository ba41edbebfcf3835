"""Which nodes become WireGuard peers: a remote node record never takes this cluster's addresses."""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

from clustermesh.models import Node, NodeAddress
from clustermesh.tables import NODES, nodes_table
from encryption.config import EncryptionConfig
from encryption.module import Encryption
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES, LocalNode, NodeAttributes


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def node(cluster: str, name: str, ip: str, cidr: str, n: int) -> Node:
    return Node(name, cluster, 1 if cluster == "east" else 2, (NodeAddress("InternalIP", ip),),
                cidr, wireguard_pubkey=key(n))


def encryption(tmp_path: Path, strict: bool) -> Encryption:
    hive = Hive(agent=SimpleNamespace(node=SimpleNamespace(mtu=1500)), state_dir=tmp_path)
    hive.provide(LOCAL_NODE, LocalNode("east", 1, "n1", "172.31.1.11", "10.1.1.0/24"))
    nodes = hive.provide(NODES, nodes_table())
    hive.provide(NODE_ATTRIBUTES, NodeAttributes())
    for n in (node("east", "n1", "172.31.1.11", "10.1.1.0/24", 1),
              node("east", "n2", "172.31.1.12", "10.1.2.0/24", 2),
              node("west", "n1", "172.31.2.11", "10.2.1.0/24", 3),
              # a west record that claims east-n2's pod CIDR, and one that claims its address
              node("west", "evil", "172.31.2.66", "10.1.2.0/25", 4),
              node("west", "liar", "172.31.1.12", "10.2.9.0/24", 5)):
        nodes.upsert(n)
    return Encryption(hive, EncryptionConfig.model_validate({"enabled": True, "strict": strict}))


def test_a_remote_node_claiming_local_addresses_is_no_peer_and_gets_no_route(tmp_path: Path) -> None:
    for strict in (False, True):
        enc = encryption(tmp_path / str(strict), strict)
        enc._compute()
        peers = {p.node: p for p in enc.peers}
        assert set(peers) == {("east", "n2"), ("west", "n1")}
        assert "10.1.2.0/24" in peers[("east", "n2")].allowed_ips
        assert "claims addresses of the local cluster: 10.1.2.0/25" in enc.refused["west/evil"]
        assert "172.31.1.12/32" in enc.refused["west/liar"]
        routes = {(r.dst, r.kind) for r in enc.routes}
        assert ("10.1.2.0/25", "blackhole") not in routes and ("10.1.2.0/25", "device") not in routes
        assert ("10.1.2.0/24", "device") in routes
        # the liar's own CIDR is not the local cluster's: strict mode still refuses it in clear
        assert (("10.2.9.0/24", "blackhole") in routes) is strict


def test_an_enrolled_host_routes_every_global_service_frontend_through_the_device(
        tmp_path: Path) -> None:
    from clustermesh.models import L4Addr
    from clustermesh.tables import GLOBAL_SERVICES, GlobalService, ServiceName
    from plexus.core.tables import Table

    def service(name: str, *ips: str) -> GlobalService:
        return GlobalService("default", name, {ip: {"": L4Addr("TCP", 80)} for ip in ips}, ())

    for on in (False, True):
        hive = Hive(agent=SimpleNamespace(node=SimpleNamespace(mtu=1500)), state_dir=tmp_path / str(on))
        hive.provide(LOCAL_NODE, LocalNode("east", 1, "vm1", "172.31.3.10", ""))
        nodes = hive.provide(NODES, nodes_table())
        hive.provide(NODE_ATTRIBUTES, NodeAttributes())
        services: Table[ServiceName, GlobalService] = hive.provide(
            GLOBAL_SERVICES, Table("global-services", key=lambda s: s.key))
        nodes.upsert(node("west", "n1", "172.31.2.11", "10.2.1.0/24", 3))
        services.upsert(service("web", "10.96.1.30", "fd00:96::30"))
        services.upsert(service("db", "10.96.1.31", "not-an-address"))
        enc = Encryption(hive, EncryptionConfig.model_validate(
            {"enabled": True, "strict": True, "serviceFrontends": on}))
        enc._compute()
        routes = {(r.dst, r.kind) for r in enc.routes}
        assert ("10.2.1.0/24", "device") in routes
        frontends = {("10.96.1.30/32", "device"), ("fd00:96::30/128", "device"),
                     ("10.96.1.31/32", "device")}
        assert (frontends <= routes) is on
        if on:
            assert next(r for r in enc.routes if r.dst == "10.96.1.30/32").node == ("default", "web")
            services.delete(("default", "web"))
            enc._compute()
            assert "10.96.1.30/32" not in {r.dst for r in enc.routes}


def test_tunnels_between_nodes_route_to_each_peers_address_from_this_nodes_own(
        tmp_path: Path) -> None:
    for strict in (False, True):
        enc = encryption(tmp_path / str(strict), strict)
        enc.nodes.upsert(Node("n3", "west", 2, (NodeAddress("InternalIP", "172.31.2.13"),),
                              "10.2.3.0/24"))  # no key published yet: no peer
        enc._compute()
        routes = {r.dst: (r.kind, r.src) for r in enc.tunnel_routes}
        assert routes["172.31.1.12/32"] == ("device", "172.31.1.11")
        assert routes["172.31.2.11/32"] == ("device", "172.31.1.11")
        # a record claiming a local node's address never takes that node's tunnel
        assert "172.31.2.66/32" not in routes
        assert [r.node for r in enc.tunnel_routes if r.dst == "172.31.1.12/32"] == [("east", "n2")]
        # no peer: strict mode drops what would go in the clear
        assert routes.get("172.31.2.13/32") == (("blackhole", None) if strict else None)
        assert "172.31.1.11/32" not in routes  # not to itself


def test_a_peer_allows_each_node_address_as_a_host_prefix_of_its_family(tmp_path: Path) -> None:
    enc = encryption(tmp_path, strict=False)
    nodes = enc.hive.require(NODES)
    dual = node("west", "n2", "172.31.2.12", "10.2.2.0/24", 6)
    nodes.upsert(Node(dual.name, dual.cluster, dual.cluster_id,
                      (*dual.addresses, NodeAddress("InternalIP", "fd00:31:2::12")),
                      dual.ipv4_alloc_cidr, wireguard_pubkey=dual.wireguard_pubkey))
    enc._compute()
    allowed = next(p for p in enc.peers if p.node == ("west", "n2")).allowed_ips
    assert "172.31.2.12/32" in allowed and "fd00:31:2::12/128" in allowed
    assert not any(a.startswith("fd00:31:2::12/") and not a.endswith("/128") for a in allowed)

"""Who may say what an address is: the rules for remote claims, as tables of cases, and the
merged ipcache kept equal to them as claims and node records come and go."""

from __future__ import annotations

import pytest

from clustermesh.models import (
    ID_HEALTH,
    ID_HOST,
    ID_INGRESS,
    ID_INIT,
    ID_KUBE_APISERVER,
    ID_REMOTE_NODE,
    ID_UNMANAGED,
    ID_WORLD,
    IPIdentity,
    Node,
    NodeAddress,
)
from clustermesh.ownership import IpcacheMerge, Owned, claims_table, refusal, resolve
from clustermesh.tables import ipcache_table, nodes_table

WEST_ID = 2 << 16 | 5
EAST_ID = 1 << 16 | 5
WEST_NODE = Node("n1", "west", 2, (NodeAddress("InternalIP", "172.31.2.11"),
                                   NodeAddress("CiliumInternalIP", "10.2.1.1")),
                 ipv4_alloc_cidr="10.2.1.0/24", ipv6_alloc_cidr="fd00:2:1::/64",
                 secondary_alloc_cidrs=("10.20.0.0/24",))
WEST = Owned.of([WEST_NODE])


def west(ip: str, ident: int = WEST_ID, prefix_len: int | None = None) -> IPIdentity:
    return IPIdentity(ip, ident, prefix_len=prefix_len, cluster="west")


# (what, claim, refused because) -- None: accepted
RULES: list[tuple[str, IPIdentity, str | None]] = [
    ("pod IP in its pod CIDR", west("10.2.1.5"), None),
    ("pod IP in its IPv6 pod CIDR", west("fd00:2:1::5"), None),
    ("pod IP in a secondary pod CIDR", west("10.20.0.9"), None),
    ("a prefix inside its pod CIDR", west("10.2.1.128", prefix_len=25), None),
    ("its node IP", west("172.31.2.11"), None),
    ("another cluster's pod IP", west("10.1.2.1"), "not in a pod CIDR or a node address of west"),
    ("an internet address", west("8.8.8.8"), "not in a pod CIDR or a node address of west"),
    ("a prefix wider than its pod CIDR", west("10.2.0.0", prefix_len=16), "not in a pod CIDR"),
    ("the default route", west("0.0.0.0", prefix_len=0), "not in a pod CIDR"),
    ("IPv6 outside its CIDR", west("fd00:1:1::5"), "not in a pod CIDR"),
    ("init, reserved", west("10.2.1.5", ID_INIT), "identity 5 (reserved:init)"),
    ("world, reserved", west("10.2.1.5", ID_WORLD), "identity 2 (reserved:world)"),
    ("unmanaged, reserved", west("10.2.1.5", ID_UNMANAGED), "identity 3"),
    ("kube-apiserver, reserved", west("10.2.1.5", ID_KUBE_APISERVER), "identity 7"),
    ("unknown identity 0", west("10.2.1.5", 0), "identity 0"),
    ("an unnamed identity below 256", west("10.2.1.5", 200), "identity 200 (reserved)"),
    ("health in its pod CIDR", west("10.2.1.9", ID_HEALTH), None),
    ("ingress in its pod CIDR", west("10.2.1.10", ID_INGRESS), None),
    ("host on its node IP", west("172.31.2.11", ID_HOST), None),
    ("remote-node on its router IP", west("10.2.1.1", ID_REMOTE_NODE), None),
    ("remote-node on a pod IP", west("10.2.1.5", ID_REMOTE_NODE), "only for a node address of west"),
    ("host on an internet address", west("8.8.8.8", ID_HOST), "only for a node address"),
]


@pytest.mark.parametrize(("what", "claim", "why"), RULES, ids=[r[0] for r in RULES])
def test_a_remote_claims_only_what_it_owns(what: str, claim: IPIdentity, why: str | None) -> None:
    """Reserved identities from a remote: Cilium's ipcache watcher takes a peer's "host" as
    remote-node (cilium/cilium pkg/ipcache/kvstore.go, `OnUpdate`), and its clustermesh
    identity validator lets reserved IDs through unscoped (`WithIdentityValidator`, same file,
    used by pkg/clustermesh/remote_cluster.go); here only those that describe the remote's
    own nodes and endpoints pass (host, remote-node, health, ingress), the others are this
    agent's own view (init, world, unmanaged, kube-apiserver) and are refused."""
    got = refusal(claim, WEST)
    if why is None:
        assert got is None, what
    else:
        assert got is not None and why in got, (what, got)


def test_a_remote_node_overlapping_the_local_cluster_owns_none_of_it() -> None:
    local = Owned.of([Node("n2", "east", 1, (NodeAddress("InternalIP", "172.31.1.12"),),
                           ipv4_alloc_cidr="10.1.2.0/24")])
    greedy = Owned.of([Node("n1", "west", 2, (NodeAddress("InternalIP", "172.31.1.12"),),
                            ipv4_alloc_cidr="10.1.0.0/16")])
    assert refusal(west("10.1.3.4"), greedy, local, "east") is None
    for ip in ("10.1.2.1", "172.31.1.12"):
        why = refusal(west(ip), greedy, local, "east")
        assert why is not None and "of the local cluster east" in why


def test_nothing_is_owned_before_a_node_record() -> None:
    assert refusal(west("10.2.1.5"), Owned()) is not None


LOCAL_E = IPIdentity("10.2.1.5", EAST_ID, cluster="east")
WEST_E = west("10.2.1.5")
NORTH = Owned.of([Node("n1", "north", 3, ipv4_alloc_cidr="10.2.0.0/16")])
NORTH_E = IPIdentity("10.2.1.5", 3 << 16 | 5, cluster="north")

# (what, claims, winner cluster, {refused cluster: part of the reason})
RANKS: list[tuple[str, list[IPIdentity], str | None, dict[str, str]]] = [
    ("the local cluster alone", [LOCAL_E], "east", {}),
    ("a remote alone", [WEST_E], "west", {}),
    ("local wins over a valid remote", [WEST_E, LOCAL_E], "east",
     {"west": "held by the local cluster east"}),
    ("two remotes: the lowest name wins", [WEST_E, NORTH_E], "north",
     {"west": "held by cluster north"}),
    ("an invalid remote does not shadow a valid one", [west("10.2.1.5", ID_INIT), NORTH_E],
     "north", {"west": "identity 5"}),
    ("every claim refused: no row", [west("8.8.8.8")], None, {"west": "not in a pod CIDR"}),
]


@pytest.mark.parametrize(("what", "claims", "winner", "refused"), RANKS, ids=[r[0] for r in RANKS])
def test_one_prefix_resolves_by_rank(what: str, claims: list[IPIdentity], winner: str | None,
                                     refused: dict[str, str]) -> None:
    row, why = resolve({c.cluster: c for c in claims}, {"west": WEST, "north": NORTH}, "east")
    assert (row.cluster if row else None) == winner, what
    assert why.keys() == refused.keys(), what
    for cluster, part in refused.items():
        assert part in why[cluster], (what, why)


def test_a_peers_host_is_a_remote_node_here() -> None:
    row, _ = resolve({"west": west("172.31.2.11", ID_HOST)}, {"west": WEST}, "east")
    assert row is not None and row.identity == ID_REMOTE_NODE


class Mesh:
    def __init__(self) -> None:
        self.claims = claims_table()
        self.nodes = nodes_table()
        self.ipcache = ipcache_table()
        self.merge = IpcacheMerge("east", self.claims, self.nodes, self.ipcache)

    def claim(self, e: IPIdentity) -> None:
        self.claims.upsert(e)
        self.merge.claims_changed([(e.cluster, e.prefix)])

    def unclaim(self, e: IPIdentity) -> None:
        self.claims.delete((e.cluster, e.prefix))
        self.merge.claims_changed([(e.cluster, e.prefix)])

    def node(self, n: Node, present: bool = True) -> None:
        (self.nodes.upsert(n) if present else self.nodes.delete(n.key))
        self.merge.nodes_changed([n.key])

    def holder(self, prefix: str) -> str | None:
        row = self.ipcache.get(prefix)
        return row.cluster if row else None


def test_a_claim_before_its_node_is_held_then_applied_and_goes_with_the_node() -> None:
    m = Mesh()
    m.claim(WEST_E)
    assert m.holder("10.2.1.5/32") is None
    assert "10.2.1.5/32" in m.merge.refusals_of("west").reasons
    m.node(WEST_NODE)
    assert m.holder("10.2.1.5/32") == "west"
    assert m.merge.refusals_of("west").reasons == {}
    m.node(WEST_NODE, present=False)
    assert m.holder("10.2.1.5/32") is None
    assert m.merge.refusals_of("west").reasons.keys() == {"10.2.1.5/32"}


def test_claims_merged_before_the_node_feed_is_read_take_the_nodes_table_as_it_is() -> None:
    """A cluster's claims may be merged before its listed nodes are passed to the merge:
    they are judged on the nodes table as it is, and none stays refused once it holds
    them, whichever feed comes first."""
    m = Mesh()
    early = IPIdentity("10.2.1.6", 0x20100, cluster="west")
    m.claim(early)  # no node record anywhere yet: refused
    assert m.holder("10.2.1.6/32") is None
    m.nodes.upsert(WEST_NODE)  # listed; its change not yet passed to the merge
    m.claim(WEST_E)
    assert m.holder("10.2.1.5/32") == "west"
    assert m.holder("10.2.1.6/32") == "west"  # judged again with the nodes now known
    m.merge.nodes_changed([WEST_NODE.key])  # the nodes feed catches up: nothing changes
    assert m.merge.refusals_of("west").reasons == {}
    assert {m.holder("10.2.1.5/32"), m.holder("10.2.1.6/32")} == {"west"}


def test_a_node_whose_cidr_changes_takes_its_claims_along() -> None:
    m = Mesh()
    m.node(WEST_NODE)
    m.claim(WEST_E)
    assert m.holder("10.2.1.5/32") == "west"
    m.node(Node("n1", "west", 2, WEST_NODE.addresses, ipv4_alloc_cidr="10.2.7.0/24"))
    assert m.holder("10.2.1.5/32") is None
    assert "not in a pod CIDR" in m.merge.refusals_of("west").last


def test_local_wins_and_a_valid_remote_takes_over_when_the_local_entry_goes() -> None:
    m = Mesh()
    m.node(WEST_NODE)
    m.claim(LOCAL_E)
    m.claim(WEST_E)
    assert m.holder("10.2.1.5/32") == "east"
    assert "held by the local cluster" in m.merge.refusals_of("west").last
    m.unclaim(LOCAL_E)
    assert m.holder("10.2.1.5/32") == "west"
    assert m.merge.refusals_of("west").reasons == {}
    m.claim(LOCAL_E)  # and the local entry takes it back
    assert m.holder("10.2.1.5/32") == "east"
    m.unclaim(WEST_E)
    assert m.holder("10.2.1.5/32") == "east" and m.merge.refusals_of("west").reasons == {}


def test_a_refused_remote_never_replaces_the_local_entry_in_any_order() -> None:
    for order in ([LOCAL_E, west("10.2.1.5", ID_INIT)], [west("10.2.1.5", ID_INIT), LOCAL_E]):
        m = Mesh()
        m.node(WEST_NODE)
        for e in order:
            m.claim(e)
        row = m.ipcache.get("10.2.1.5/32")
        assert row == LOCAL_E


def test_rebuild_equals_the_incremental_result() -> None:
    m = Mesh()
    for e in (LOCAL_E, WEST_E, west("8.8.8.8"), west("10.2.1.6"), NORTH_E):
        m.claim(e)
    m.node(WEST_NODE)
    m.node(Node("n1", "north", 3, ipv4_alloc_cidr="10.2.0.0/16"))
    incremental = dict(m.ipcache.items())
    refused = {c: dict(m.merge.refusals_of(c).reasons) for c in ("west", "north")}
    m.ipcache.upsert(IPIdentity("10.9.9.9", EAST_ID, cluster="east"))  # stale: no claim
    m.merge.rebuild()
    assert dict(m.ipcache.items()) == incremental
    assert {c: dict(m.merge.refusals_of(c).reasons) for c in ("west", "north")} == refused
    assert set(incremental) == {"10.2.1.5/32", "10.2.1.6/32"}
    assert refused["west"].keys() == {"10.2.1.5/32", "8.8.8.8/32"}
    assert refused["north"].keys() == {"10.2.1.5/32"}


def test_secondary_cidrs_survive_the_wire() -> None:
    back = Node.from_json(WEST_NODE.to_json())
    assert back.secondary_alloc_cidrs == ("10.20.0.0/24",)
    # Go writes a nil slice as null (pkg/node/types/node.go has no omitempty)
    assert '"IPv4SecondaryAllocCIDRs":null' in Node("n2", "west", 2).to_json()


def test_the_local_cluster_changing_its_nodes_re_judges_remote_claims() -> None:
    m = Mesh()
    east_n2 = Node("n2", "east", 1, ipv4_alloc_cidr="10.1.2.0/24")
    m.node(Node("n1", "west", 2, ipv4_alloc_cidr="10.1.0.0/16"))
    m.node(east_n2)
    m.claim(west("10.1.2.1"))
    assert m.holder("10.1.2.1/32") is None
    assert "local cluster east" in m.merge.refusals_of("west").last
    m.node(east_n2, present=False)
    assert m.holder("10.1.2.1/32") == "west"
    m.node(east_n2)
    assert m.holder("10.1.2.1/32") is None

"""Global service load-balancing rows: frontends and backends from merged services."""

from __future__ import annotations

from bpf.lb import BackendIds, LbBackend, LbFrontend, derive
from clustermesh.models import ClusterService, L4Addr
from clustermesh.services import merge

PORTS = {"http": L4Addr("TCP", 80), "dns": L4Addr("UDP", 53)}
TARGETS = {"http": L4Addr("TCP", 8080), "dns": L4Addr("UDP", 5353)}
CLUSTER_IDS = {"east": 1, "west": 2}


def svc(cluster: str, backends: list[str], affinity: str = "none", vip: str = "10.96.0.10",
        shared: bool = True) -> ClusterService:
    return ClusterService(cluster, "default", "web", frontends={vip: PORTS},
                          backends={ip: TARGETS for ip in backends},
                          labels={"service.cilium.io/affinity": affinity}, shared=shared)


def rows(services: list[ClusterService], ids: BackendIds | None = None
         ) -> tuple[list[LbFrontend], list[LbBackend]]:
    return derive(merge(services, "east"), CLUSTER_IDS, ids or BackendIds())


def backends_of(f: LbFrontend, bes: list[LbBackend]) -> set[tuple[str, int, str]]:
    by_id = {b.id: b for b in bes}
    return {(by_id[i].ip, by_id[i].port, by_id[i].cluster) for i in f.backend_ids}


def test_every_port_and_protocol_is_a_frontend_with_backends_of_every_cluster() -> None:
    fronts, bes = rows([svc("east", ["10.1.1.5"]), svc("west", ["10.2.1.5", "10.2.2.5"])])
    assert [f.key for f in fronts] == [("10.96.0.10", 53, 17), ("10.96.0.10", 80, 6)]
    tcp = fronts[1]
    assert tcp.service == "default/web" and tcp.affinity == "none"
    assert backends_of(tcp, bes) == {("10.1.1.5", 8080, "east"), ("10.2.1.5", 8080, "west"),
                                     ("10.2.2.5", 8080, "west")}
    assert backends_of(fronts[0], bes) == {("10.1.1.5", 5353, "east"), ("10.2.1.5", 5353, "west"),
                                           ("10.2.2.5", 5353, "west")}
    assert {b.cluster_id for b in bes if b.cluster == "west"} == {2}
    assert len({b.id for b in bes}) == len(bes) == 6


def test_affinity_local_prefers_this_clusters_backends_while_it_has_any() -> None:
    fronts, bes = rows([svc("east", ["10.1.1.5"], "local"), svc("west", ["10.2.1.5"])])
    assert {c for f in fronts for _, _, c in backends_of(f, bes)} == {"east"}
    assert fronts[0].affinity == "local"
    fronts, bes = rows([svc("east", [], "local"), svc("west", ["10.2.1.5"])])
    assert {c for f in fronts for _, _, c in backends_of(f, bes)} == {"west"}
    fronts, bes = rows([svc("east", ["10.1.1.5"], "remote"), svc("west", ["10.2.1.5"])])
    assert {c for f in fronts for _, _, c in backends_of(f, bes)} == {"west"}


def test_unshared_remote_copies_and_unsupported_frontends_are_left_out() -> None:
    s = ClusterService("east", "default", "web",
                       frontends={"10.96.0.10": {"sctp": L4Addr("SCTP", 9)}, "fd00::10": PORTS},
                       backends={"10.1.1.5": TARGETS})
    fronts, _ = rows([s, svc("west", ["10.2.1.5"], shared=False)])
    assert fronts == []
    fronts, bes = rows([svc("east", ["10.1.1.5"]), svc("west", ["10.2.1.5"], shared=False)])
    assert {c for f in fronts for _, _, c in backends_of(f, bes)} == {"east"}


def test_backend_ids_are_stable_never_reused_and_adopted() -> None:
    ids = BackendIds()
    _, first = rows([svc("east", ["10.1.1.5", "10.1.1.6"])], ids)
    kept = {b.addr: b.id for b in first}
    _, second = rows([svc("east", ["10.1.1.6", "10.1.1.7"])], ids)
    now = {b.addr: b.id for b in second}
    assert all(now[a] == kept[a] for a in now if a in kept)
    gone = {i for a, i in kept.items() if a not in now}
    assert gone and not gone & set(now.values())  # a removed backend's id is not handed out
    adopted = BackendIds(now)
    _, third = rows([svc("east", ["10.1.1.6", "10.1.1.7", "10.1.1.8"])], adopted)
    assert {b.addr: b.id for b in third if b.addr in now} == now
    assert min(b.id for b in third if b.addr not in now) > max(now.values())

"""Every Ops class that talks netlink, on the kernel of a fresh network namespace.

Each test makes its own namespace (removed afterwards, failure or not) and hands the Ops
class a `Netlink` naming it, as the agent hands it its own. For each: after update the
kernel has the object, update again changes nothing, delete removes it, delete of what is
gone is success, prune removes what no row names and keeps what rows name.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bpf.attach import INGRESS
from bpf.loader import Datapath
from bpf.ops import Attachment, AttachOps, Ifindexes
from clustermesh.ops import RTPROT_PLEXUS as MESH_PROTO
from clustermesh.ops import DirectRoute
from clustermesh.ops import RouteOps as DirectRouteOps
from encryption.config import EncryptionConfig
from encryption.keys import KeyPair
from encryption.ops import RTPROT_PLEXUS, PeerOps, RouteOps, UserspaceBackend
from encryption.tables import EncryptedRoute, Peer
from plexus.cni import ops as cni
from plexus.core.netlink import Netlink
from plexus.core.reconciler import TemporaryError
from tests.support import netns, sh, unique

PREFIX = "plx-t"
RTN_BLACKHOLE = 6  # linux/rtnetlink.h
NODE = ("c1", "n2")
# bcc wants bytes for names and program text and says so once per call
pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
STILL_RUNNING = "ignore:subprocess .* is still running:ResourceWarning"


@pytest.fixture
def ns(root: None) -> Iterator[str]:
    with netns(PREFIX) as name:
        yield name


def dump(ns: str, *cmd: str) -> list[dict[str, Any]]:
    out = sh(*cmd[:1], "-j", *cmd[1:], ns=ns).stdout.strip()
    return cast(list[dict[str, Any]], json.loads(out) if out else [])


def link(ns: str, name: str, *addrs: str) -> None:
    """An interface that is up, with carrier: one end of a veth pair (no dummy module here)."""
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p", ns=ns)
    for a in addrs:
        sh("ip", "addr", "add", a, "dev", name, ns=ns)
    sh("ip", "link", "set", f"{name}p", "up", ns=ns)
    sh("ip", "link", "set", name, "up", ns=ns)


def test_a_netlink_naming_no_namespace_is_refused_not_created(root: None) -> None:
    name = unique(PREFIX)
    with pytest.raises(FileNotFoundError):
        Netlink(name).route()
    assert not os.path.exists(f"/var/run/netns/{name}")


# ---- encryption: routes in their own table, an ip rule per family ----------------------

CFG = EncryptionConfig.model_validate({})  # the defaults the agent runs with


def table_routes(ns: str) -> dict[str, dict[str, Any]]:
    out = {}
    # numbers, not names: another package's rt_protos may name our protocol number
    for family in ("-4", "-6"):
        for r in dump(ns, "ip", "-N", family, "route", "show", "table", str(CFG.table)):
            out[r["dst"]] = r
    return out


def rules(ns: str, family: str) -> list[dict[str, Any]]:
    return [r for r in dump(ns, "ip", family, "rule", "show")
            if str(r.get("table")) == str(CFG.table)]


def test_encryption_rules_for_both_families_once(ns: str) -> None:
    ops = RouteOps("plxwg", CFG.table, CFG.rule_priority, Netlink(ns))
    ops.ensure_rule()
    ops.ensure_rule()
    for family in ("-4", "-6"):
        found = rules(ns, family)
        assert [r["priority"] for r in found] == [CFG.rule_priority], (family, found)
        assert not [r for r in dump(ns, "ip", family, "rule", "show") if "fwmark" in r]


async def test_the_devices_own_packets_bypass_its_table_by_their_mark(ns: str) -> None:
    ops = RouteOps("plxwg", CFG.table, CFG.rule_priority, Netlink(ns), fwmark=CFG.fwmark)
    assert await asyncio.to_thread(ops.ensure_rule)
    assert not await asyncio.to_thread(ops.ensure_rule)
    for family in ("-4", "-6"):
        marked = [r for r in dump(ns, "ip", family, "rule", "show") if "fwmark" in r]
        assert [(r["priority"], r["table"], int(r["fwmark"], 16), int(r["fwmask"], 16))
                for r in marked] == [(CFG.rule_priority - 1, "main", CFG.fwmark, CFG.fwmark)]
        assert [r["priority"] for r in rules(ns, family)] == [CFG.rule_priority]
    # an enrolled host's address routes through the device; what the device sends does not
    link(ns, "plxwg", "172.31.1.11/24")
    await ops.update(EncryptedRoute("172.31.3.10/32", "device", NODE))
    sh("ip", "route", "add", "default", "via", "172.31.1.1", ns=ns)
    plain = sh("ip", "-4", "route", "get", "172.31.3.10", ns=ns).stdout
    by_mark = sh("ip", "-4", "route", "get", "172.31.3.10", "mark", str(CFG.fwmark), ns=ns).stdout
    assert "dev plxwg " in plain and "via" not in plain, plain
    assert "via 172.31.1.1" in by_mark, by_mark


async def test_tunnels_udp_ports_route_to_other_nodes_through_the_device(ns: str) -> None:
    ports = [8472]
    ops = RouteOps("plxwg", CFG.tunnel_table, CFG.tunnel_rule_priority, Netlink(ns),
                   strict=True, udp_ports=lambda: ports)
    link(ns, "eth0", "172.31.1.11/24")
    sh("ip", "route", "add", "default", "via", "172.31.1.1", ns=ns)
    link(ns, "plxwg")
    assert await asyncio.to_thread(ops.ensure_rule)
    assert not await asyncio.to_thread(ops.ensure_rule)
    await ops.update(EncryptedRoute("172.31.2.11/32", "device", NODE, "172.31.1.11"))

    def route(port: int) -> str:
        return sh("ip", "-4", "route", "get", "172.31.2.11", "ipproto", "udp", "dport", str(port),
                  ns=ns).stdout

    assert "dev plxwg " in route(8472) and "src 172.31.1.11" in route(8472), route(8472)
    assert "dev eth0 " in route(51871), route(51871)  # WireGuard's own packets: the underlay
    # the port no longer listed: its rule goes, the new one comes
    ports[:] = [4789]
    assert await asyncio.to_thread(ops.ensure_rule)
    assert "dev eth0 " in route(8472) and "dev plxwg " in route(4789)
    tunnel_rules = [r for r in dump(ns, "ip", "-4", "rule", "show")
                    if str(r.get("table")) == str(CFG.tunnel_table)]
    assert [(r["priority"], r.get("dport")) for r in tunnel_rules] == [
        (CFG.tunnel_rule_priority, 4789)], tunnel_rules
    # the device gone: strict mode's fallback drops the tunnel rather than sending it clear
    sh("ip", "link", "del", "plxwg", ns=ns)
    r = sh("ip", "-4", "route", "get", "172.31.2.11", "ipproto", "udp", "dport", "4789", ns=ns,
           check=False)
    assert "eth0" not in r.stdout and (r.returncode != 0 or "blackhole" in r.stdout), r


async def test_encryption_routes_update_delete_prune_in_both_families(ns: str) -> None:
    link(ns, "plxwg")
    ops = RouteOps("plxwg", CFG.table, CFG.rule_priority, Netlink(ns))
    v4 = EncryptedRoute("10.2.1.0/24", "device", NODE)
    v6 = EncryptedRoute("fd00:2:1::/64", "device", NODE)
    hole4 = EncryptedRoute("10.2.2.0/24", "blackhole", NODE)
    hole6 = EncryptedRoute("fd00:2:2::/64", "blackhole", NODE)
    rows = [v4, v6, hole4, hole6]

    for r in rows:
        await ops.update(r)
    routes = table_routes(ns)
    assert set(routes) == {r.dst for r in rows}
    assert routes[v4.dst]["dev"] == routes[v6.dst]["dev"] == "plxwg"
    assert routes[hole4.dst]["type"] == routes[hole6.dst]["type"] == str(RTN_BLACKHOLE)
    assert all(r["protocol"] == str(RTPROT_PLEXUS) for r in routes.values())

    for r in rows:
        await ops.update(r)
    assert table_routes(ns) == routes

    await ops.delete(v6)
    await ops.delete(hole4)
    assert set(table_routes(ns)) == {v4.dst, hole6.dst}
    await ops.delete(v6)
    await ops.delete(hole4)

    # strays of both families, as a row removed while the agent was down leaves them
    sh("ip", "-4", "route", "add", "10.2.9.0/24", "dev", "plxwg", "table", str(CFG.table), ns=ns)
    sh("ip", "-6", "route", "add", "fd00:2:9::/64", "dev", "plxwg", "table", str(CFG.table),
       ns=ns)
    await ops.update(v6)
    await ops.prune([v4, v6])
    assert set(table_routes(ns)) == {v4.dst, v6.dst}
    await ops.prune([v4, v6])
    assert set(table_routes(ns)) == {v4.dst, v6.dst}
    await ops.prune([])
    assert table_routes(ns) == {}


async def test_encryption_route_without_its_device_is_retried(ns: str) -> None:
    ops = RouteOps("plxwg", CFG.table, CFG.rule_priority, Netlink(ns))
    with pytest.raises(TemporaryError):
        await ops.update(EncryptedRoute("fd00:2:1::/64", "device", NODE))


# ---- encryption: WireGuard peers, on wireguard-go inside the namespace ------------------

# wireguard-go outlives the Popen object on purpose (stop is not remove)
@pytest.fixture
def wireguard(ns: str, tmp_path: Path) -> Iterator[UserspaceBackend]:
    if shutil.which("wireguard-go") is None:
        pytest.fail("wireguard-go is not installed: run scripts/setup.sh")
    backend = UserspaceBackend(unique("plxt"), tmp_path, netlink=Netlink(ns))
    try:
        backend.ensure(KeyPair.generate(), 0, 1400)
        yield backend
    finally:
        backend.remove()


def peer(n: int) -> Peer:
    return Peer(("c1", f"n{n}"), KeyPair.generate().public_bytes, f"192.0.2.{n}", 51871,
                (f"10.3.{n}.0/24",))


@pytest.mark.filterwarnings(STILL_RUNNING)
async def test_wireguard_device_is_made_in_the_namespace(
        ns: str, wireguard: UserspaceBackend) -> None:
    link = dump(ns, "ip", "link", "show", "dev", wireguard.device)[0]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert sh("ip", "link", "show", "dev", wireguard.device, check=False).returncode != 0


@pytest.mark.filterwarnings(STILL_RUNNING)
def test_wireguard_go_marks_its_packets(ns: str, tmp_path: Path) -> None:
    backend = UserspaceBackend(unique("plxt"), tmp_path, netlink=Netlink(ns), fwmark=CFG.fwmark)
    try:
        keys = KeyPair.generate()
        backend.ensure(keys, 0, 1400)
        assert backend.info().fwmark == CFG.fwmark
        backend.uapi.set_device(keys.private_bytes, 0, 0)  # changed behind the agent's back
        backend.ensure(keys, 0, 1400)
        assert backend.info().fwmark == CFG.fwmark
    finally:
        backend.remove()


@pytest.mark.filterwarnings(STILL_RUNNING)
async def test_wireguard_peers_update_delete_prune(wireguard: UserspaceBackend) -> None:
    ops = PeerOps(wireguard)
    a, b, c = peer(1), peer(2), peer(3)

    await ops.update(a)
    info = wireguard.info()
    assert set(info.peers) == {a.public_key}
    assert info.peers[a.public_key].allowed_ips == list(a.allowed_ips)
    await ops.update(a)
    assert set(wireguard.info().peers) == {a.public_key}

    await ops.delete(a)
    assert wireguard.info().peers == {}
    await ops.delete(a)

    for p in (a, b, c):
        await ops.update(p)
    await ops.prune([a, c])
    assert set(wireguard.info().peers) == {a.public_key, c.public_key}
    await ops.prune([a, c])
    assert set(wireguard.info().peers) == {a.public_key, c.public_key}


# ---- clustermesh: direct routes in the main table ---------------------------------------

def mesh_routes(ns: str) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in dump(ns, "ip", "-4", "route", "show", "proto", str(MESH_PROTO))}


async def test_direct_routes_update_delete_prune(ns: str) -> None:
    link(ns, "plxseg", "192.168.77.1/24")
    ops = DirectRouteOps(Netlink(ns))
    a = DirectRoute("10.9.1.0/24", "192.168.77.2")
    b = DirectRoute("10.9.2.0/24", "192.168.77.3")

    await ops.update(a)
    assert mesh_routes(ns)[a.dst]["gateway"] == a.via
    before = mesh_routes(ns)
    await ops.update(a)
    assert mesh_routes(ns) == before

    await ops.delete(a)
    assert mesh_routes(ns) == {}
    await ops.delete(a)

    # a route of someone else's (another protocol) is not ours to prune
    sh("ip", "route", "add", "10.9.8.0/24", "via", "192.168.77.4", ns=ns)
    sh("ip", "route", "add", "10.9.9.0/24", "via", "192.168.77.5", "proto", str(MESH_PROTO),
       ns=ns)
    await ops.update(a)
    await ops.update(b)
    await ops.prune([a])
    assert set(mesh_routes(ns)) == {a.dst}
    assert "10.9.8.0/24" in {r["dst"] for r in dump(ns, "ip", "-4", "route", "show")}


async def test_direct_route_to_a_node_off_the_segment_is_retried(ns: str) -> None:
    link(ns, "plxseg", "192.168.77.1/24")
    sh("ip", "route", "add", "192.168.88.0/24", "via", "192.168.77.254", ns=ns)
    ops = DirectRouteOps(Netlink(ns))
    with pytest.raises(TemporaryError):
        await ops.update(DirectRoute("10.9.1.0/24", "192.168.88.2"))  # behind a router
    with pytest.raises(TemporaryError):
        await ops.update(DirectRoute("10.9.1.0/24", "203.0.113.9"))  # no route at all
    assert mesh_routes(ns) == {}


# ---- bpf: programs on host veths -------------------------------------------------------

PROGRAMS = b"""
int from_pod(struct __sk_buff *skb) { return 0; }
int to_pod(struct __sk_buff *skb) { return 0; }
int from_pod_l3(struct __sk_buff *skb) { return 0; }
int to_pod_l3(struct __sk_buff *skb) { return 0; }
"""


@pytest.fixture(scope="module")
def programs() -> Iterator[Datapath]:
    """Two programs named as the datapath's, so AttachOps attaches them as it does those."""
    from bcc import BPF

    bpf = BPF(text=PROGRAMS)
    dp = SimpleNamespace(**{name: bpf.load_func(name.encode(), BPF.SCHED_CLS)
                            for name in ("from_pod", "to_pod", "from_pod_l3", "to_pod_l3")})
    yield cast(Datapath, dp)
    bpf.cleanup()


def filters(ns: str, ifname: str, parent: str) -> list[str]:
    out = sh("tc", "filter", "show", "dev", ifname, parent, ns=ns).stdout
    return [line for line in out.splitlines() if " bpf " in line and " handle " in line]


def foreign_filter(ns: str, ifname: str, fd: int) -> None:
    """A program of another name at tc ingress, as another tool would attach it."""
    with Netlink(ns).route() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="someone-else", parent=INGRESS,
               classid=1, direct_action=True, prio=1)


def has_clsact(ns: str, ifname: str) -> bool:
    return "clsact" in sh("tc", "qdisc", "show", "dev", ifname, ns=ns).stdout


async def test_attach_update_delete_prune(ns: str, programs: Datapath) -> None:
    for name in ("plxa", "plxb", "plxc", "plxforeign"):
        link(ns, name)
    ifindexes = Ifindexes(Netlink(ns))
    ops = AttachOps(programs, ifindexes)
    a, b, c = Attachment("plxa"), Attachment("plxb"), Attachment("plxc")

    await ops.update(a)
    ingress, egress = filters(ns, "plxa", "ingress"), filters(ns, "plxa", "egress")
    assert len(ingress) == 1 and "from_pod" in ingress[0], ingress
    assert len(egress) == 1 and "to_pod" in egress[0], egress
    assert ifindexes.cache["plxa"] == dump(ns, "ip", "link", "show", "dev", "plxa")[0]["ifindex"]
    await ops.update(a)
    assert filters(ns, "plxa", "ingress") == ingress
    assert filters(ns, "plxa", "egress") == egress

    await ops.delete(a)
    assert not has_clsact(ns, "plxa") and "plxa" not in ifindexes.cache
    await ops.delete(a)
    await ops.delete(Attachment("plxgone"))
    with pytest.raises(TemporaryError):
        await ops.update(Attachment("plxgone"))

    # someone else's clsact and filter are not ours to prune
    await asyncio.to_thread(foreign_filter, ns, "plxforeign", programs.to_pod.fd)
    for row in (a, b, c):
        await ops.update(row)
    # b's row went while the agent was down: the next run's prune finds its filters
    ops = AttachOps(programs, Ifindexes(Netlink(ns)))
    await ops.update(a)
    await ops.prune([a, c])
    assert filters(ns, "plxa", "ingress") and filters(ns, "plxc", "ingress")
    assert not has_clsact(ns, "plxb")
    assert has_clsact(ns, "plxforeign") and filters(ns, "plxforeign", "ingress")
    await ops.prune([a, c])
    assert filters(ns, "plxa", "ingress") and filters(ns, "plxc", "ingress")


async def test_an_enrolled_hosts_uplink_and_tunnel_get_their_directions_turned(
        ns: str, programs: Datapath) -> None:
    link(ns, "plxup")
    sh("ip", "tuntap", "add", "dev", "plxtun", "mode", "tun", ns=ns)
    sh("ip", "link", "set", "plxtun", "up", ns=ns)
    aliases: dict[int, int] = {}
    dp = cast(Datapath, SimpleNamespace(**vars(programs), alias_set=aliases.__setitem__))
    ops = AttachOps(dp, Ifindexes(Netlink(ns)), "plxup", "plxtun")
    link(ns, "plxpod")
    for name in ("plxup", "plxtun", "plxpod"):
        await ops.update(Attachment(name))
    # what leaves the host passes tc egress; the TUN device's packets have no link header
    assert [("from_pod" in f, "to_pod" in f) for f in filters(ns, "plxup", "egress")] == [(True, False)]
    assert ["to_pod" in f for f in filters(ns, "plxup", "ingress")] == [True]
    assert ["from_pod_l3" in f for f in filters(ns, "plxtun", "egress")] == [True]
    assert ["to_pod_l3" in f for f in filters(ns, "plxtun", "ingress")] == [True]
    assert ["from_pod" in f and "_l3" not in f for f in filters(ns, "plxpod", "ingress")] == [True]
    # the tunnel's traffic is the uplink's: judged by its policy, tracked in its conntrack
    ifindex = {n: dump(ns, "ip", "link", "show", "dev", n)[0]["ifindex"] for n in ("plxup", "plxtun")}
    assert aliases == {ifindex["plxtun"]: ifindex["plxup"]}


async def test_ifindexes_look_up_in_their_namespace(ns: str) -> None:
    link(ns, "plxonlyhere")
    ifindexes = Ifindexes(Netlink(ns))
    assert await ifindexes.find("plxonlyhere") is not None
    assert await Ifindexes().find("plxonlyhere") is None


# ---- CNI: the pod's wiring, with the node side in a named namespace ---------------------

@pytest.fixture
def pod(root: None) -> Iterator[str]:
    with netns(PREFIX + "p") as name:
        yield name


def test_pod_wiring_add_check_remove_with_the_node_in_a_namespace(ns: str, pod: str) -> None:
    host = Netlink(ns)
    host_if = cni.host_ifname("c-netns")
    path = f"/var/run/netns/{pod}"
    link = cni.add(path, "eth0", host_if, "10.4.0.5", 1400, host)
    assert link.host_ifname == host_if
    assert dump(ns, "ip", "link", "show", "dev", host_if)[0]["mtu"] == 1400
    assert sh("ip", "link", "show", "dev", host_if, check=False).returncode != 0
    assert sh("cat", f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", ns=ns).stdout.strip() == "1"
    assert cni.check(path, "eth0", host_if, "10.4.0.5", host) == []

    again = cni.add(path, "eth0", host_if, "10.4.0.5", 1400, host)
    assert again.host_ifname == host_if
    assert cni.check(path, "eth0", host_if, "10.4.0.5", host) == []

    assert cni.remove(host_if, host) is True
    assert cni.check(path, "eth0", host_if, "10.4.0.5", host) == [
        f"host interface {host_if} is missing"]
    assert cni.remove(host_if, host) is False

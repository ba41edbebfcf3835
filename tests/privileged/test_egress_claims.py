"""An egress IP of the gateways' own segment, claimed with gratuitous ARP, on real kernels:
two gateway namespaces and a host on one bridge, `ClaimOps` driving each gateway's kernel.

    host (the bridge, like the lab's router) --+-- gateway a (eth0)
                                               +-- gateway b (eth0)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from egress.claims import ArpClaim, InterfaceAddress
from egress.ops import ADDRESS_PROTOCOL, ClaimOps, ethernet_addresses
from plexus.core.netlink import Netlink
from plexus.core.reconciler import TemporaryError
from tests.support import add_netns, del_netns, sh, unique, wait_until

SEGMENT = "10.77.0"
EGRESS_IP = f"{SEGMENT}.200"
CLAIM = ArpClaim(EGRESS_IP, "eth0")
# Linux keeps a neighbour entry's address for `locktime` after a change, against ARP
# replies racing each other; an ARP announcement (sender = target) overrides it anyway.
# The host's is set far above the time the test takes, so the move can only come from that.
HOST_LOCKTIME_CENTISECONDS = 3000


@dataclass
class Segment:
    host: str
    gateways: dict[str, str]  # "a"/"b" -> namespace
    macs: dict[str, str]


@pytest.fixture
def segment(root: None) -> Iterator[Segment]:
    host = unique("plx-t")
    gateways = {g: unique("plx-t") for g in ("a", "b")}
    made: list[str] = []
    try:
        for ns in (host, *gateways.values()):
            add_netns(ns)
            made.append(ns)
        sh("ip", "link", "add", "seg", "type", "bridge", ns=host)
        sh("ip", "addr", "add", f"{SEGMENT}.1/24", "dev", "seg", ns=host)
        sh("ip", "link", "set", "seg", "up", ns=host)
        sh("sysctl", "-qw", f"net.ipv4.neigh.seg.locktime={HOST_LOCKTIME_CENTISECONDS}", ns=host)
        macs = {}
        for n, (g, ns) in enumerate(sorted(gateways.items()), start=11):
            leg = f"seg-{g}"
            sh("ip", "link", "add", leg, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=host)
            sh("ip", "link", "set", leg, "master", "seg", "up", ns=host)
            sh("ip", "addr", "add", f"{SEGMENT}.{n}/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            macs[g] = json.loads(sh("ip", "-j", "link", "show", "eth0", ns=ns).stdout)[0]["address"]
        yield Segment(host, gateways, macs)
    finally:
        for ns in made:
            del_netns(ns)


def neighbour(seg: Segment) -> dict[str, str]:
    out = json.loads(sh("ip", "-j", "neigh", "show", EGRESS_IP, "dev", "seg", ns=seg.host).stdout)
    return out[0] if out else {}


def pings(seg: Segment) -> bool:
    return sh("ping", "-c1", "-W1", EGRESS_IP, ns=seg.host, check=False).returncode == 0


def addresses(seg: Segment, g: str) -> set[InterfaceAddress]:
    return set(ethernet_addresses(Netlink(seg.gateways[g])))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_the_claim_moves_between_gateways_by_gratuitous_arp(segment: Segment) -> None:
    a, b = (ClaimOps(Netlink(segment.gateways[g])) for g in ("a", "b"))
    run(a.update(CLAIM))
    assert InterfaceAddress("eth0", EGRESS_IP, 32, ours=True) in addresses(segment, "a")
    assert InterfaceAddress("eth0", f"{SEGMENT}.11", 24) in addresses(segment, "a")  # not ours
    run(a.update(CLAIM))  # again: nothing changes
    assert [x for x in addresses(segment, "a") if x.address == EGRESS_IP] == [
        InterfaceAddress("eth0", EGRESS_IP, 32, ours=True)]
    wait_until(lambda: pings(segment), 5, what="the host pings the egress IP on gateway a")
    assert neighbour(segment).get("lladdr") == segment.macs["a"], neighbour(segment)

    run(a.delete(CLAIM))
    assert not [x for x in addresses(segment, "a") if x.address == EGRESS_IP]
    run(a.delete(CLAIM))  # gone already: success
    # No traffic from the host from here on: only b's announcement can move its entry, and
    # within its locktime (the entry was confirmed by the ping just now).
    run(b.update(CLAIM))
    wait_until(lambda: neighbour(segment).get("lladdr") == segment.macs["b"], 3,
               what=lambda: f"the host's entry follows the announcement: {neighbour(segment)}")
    assert pings(segment)
    assert neighbour(segment).get("lladdr") == segment.macs["b"]  # answered by b
    assert InterfaceAddress("eth0", EGRESS_IP, 32, ours=True) in addresses(segment, "b")


def test_an_address_someone_else_added_is_never_touched(segment: Segment) -> None:
    ns = segment.gateways["a"]
    ops = ClaimOps(Netlink(ns))
    sh("ip", "addr", "add", f"{EGRESS_IP}/32", "dev", "eth0", ns=ns)
    with pytest.raises(TemporaryError, match=f"{EGRESS_IP} is an address of eth0 that this "
                                             "agent did not add"):
        run(ops.update(CLAIM))
    run(ops.delete(CLAIM))
    run(ops.prune([]))
    assert InterfaceAddress("eth0", EGRESS_IP, 32) in addresses(segment, "a")


def test_a_missing_interface_is_a_temporary_error_naming_it(segment: Segment) -> None:
    ops = ClaimOps(Netlink(segment.gateways["a"]))
    with pytest.raises(TemporaryError, match=f"egress IP {EGRESS_IP}: no interface eth9"):
        run(ops.update(ArpClaim(EGRESS_IP, "eth9")))
    run(ops.delete(ArpClaim(EGRESS_IP, "eth9")))  # nothing there to remove: success


def test_prune_removes_marked_addresses_without_a_row_and_keeps_the_rest(segment: Segment) -> None:
    ns = segment.gateways["b"]
    ops = ClaimOps(Netlink(ns), copies=1)
    run(ops.update(CLAIM))
    stray, foreign = f"{SEGMENT}.201", f"{SEGMENT}.202"
    with Netlink(ns).route() as ipr:  # what a past run claimed and no row names any more
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=stray, prefixlen=32,
                 proto=ADDRESS_PROTOCOL)
    sh("ip", "addr", "add", f"{foreign}/32", "dev", "eth0", ns=ns)
    assert InterfaceAddress("eth0", stray, 32, ours=True) in addresses(segment, "b")
    run(ops.prune([CLAIM]))
    left = {x.address for x in addresses(segment, "b")}
    assert stray not in left
    assert {EGRESS_IP, foreign, f"{SEGMENT}.12"} <= left

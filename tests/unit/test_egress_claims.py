"""The egress IPs an active gateway claims on its own segments: which, and on which
interface (pure), and how the module feeds the claims table."""

from __future__ import annotations

import asyncio
from pathlib import Path

from egress.claims import ArpClaim, InterfaceAddress, SegmentClaims, arp_claims
from egress.ops import gratuitous_arp
from plexus.commands.egress import render
from plexus.core.clock import ManualClock
from plexus.core.manifests import Manifest
from plexus.core.node import LocalNode
from plexus.core.prefixes import HOST_PREFIXES, HostPrefix
from tests.support import eventually
from tests.unit.test_egress import body, make_module

NODE_IP = "172.31.1.12"
UPLINK = InterfaceAddress("eth0", NODE_IP, 24)


def held(*ips: str) -> list[HostPrefix]:
    return [HostPrefix(f"{ip}/{128 if ':' in ip else 32}", "egress", f"egress IP {ip}")
            for ip in ips]


def test_an_egress_ip_on_the_segment_is_claimed_on_its_interface_others_are_not() -> None:
    out = arp_claims(held("172.31.1.200", "10.255.0.10", NODE_IP, "2001:db8::10"),
                     [UPLINK, InterfaceAddress("lo", "127.0.0.1", 8)], NODE_IP)
    # off-segment: routed by BGP alone; the node IP is the node's; ARP has no IPv6
    assert out.rows == [ArpClaim("172.31.1.200", "eth0")]
    assert out.left_alone == []


def test_nothing_held_nothing_claimed() -> None:
    assert arp_claims([], [UPLINK], NODE_IP).rows == []


def test_the_most_specific_subnet_wins_then_the_interface_name() -> None:
    addrs = [UPLINK, InterfaceAddress("eth1", "172.31.1.129", 25),
             InterfaceAddress("eth3", "10.9.0.1", 16), InterfaceAddress("eth2", "10.9.0.2", 16)]
    out = arp_claims(held("172.31.1.200", "172.31.1.20", "10.9.5.5"), addrs, NODE_IP)
    assert out.rows == [ArpClaim("10.9.5.5", "eth2"), ArpClaim("172.31.1.20", "eth0"),
                        ArpClaim("172.31.1.200", "eth1")]


def test_a_host_address_covers_no_subnet_and_our_own_addresses_cover_nothing() -> None:
    addrs = [InterfaceAddress("eth0", "172.31.1.50", 32),
             InterfaceAddress("eth1", "172.31.4.1", 24, ours=True)]
    assert arp_claims(held("172.31.1.200", "172.31.4.9"), addrs, NODE_IP).rows == []


def test_an_address_someone_else_put_there_is_left_alone_and_said_so() -> None:
    addrs = [UPLINK, InterfaceAddress("eth0", "172.31.1.200", 32)]
    out = arp_claims(held("172.31.1.200", "172.31.1.201"), addrs, NODE_IP)
    assert out.rows == [ArpClaim("172.31.1.201", "eth0")]
    assert out.left_alone == ["172.31.1.200 is an address of eth0 that this agent did not add: "
                              "left as it is, not claimed"]


def test_an_address_a_past_run_claimed_is_claimed_again_not_left_alone() -> None:
    addrs = [UPLINK, InterfaceAddress("eth0", "172.31.1.200", 32, ours=True)]
    out = arp_claims(held("172.31.1.200"), addrs, NODE_IP)
    assert (out.rows, out.left_alone) == ([ArpClaim("172.31.1.200", "eth0")], [])


def test_a_gratuitous_arp_is_a_broadcast_request_for_the_address_itself() -> None:
    mac = bytes.fromhex("020000000001")
    frame = gratuitous_arp(mac, "172.31.1.200")
    assert len(frame) == 60
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    ip = bytes([172, 31, 1, 200])
    # Ethernet/IPv4, request, sender = target = the egress IP, target MAC unknown
    assert frame[14:22] == bytes.fromhex("0001080006040001")
    assert (frame[22:28], frame[28:32], frame[32:38], frame[38:42]) == (mac, ip, b"\0" * 6, ip)


async def test_the_table_prunes_only_after_a_derivation_that_saw_the_addresses() -> None:
    reads: list[list[InterfaceAddress]] = [[UPLINK, InterfaceAddress(
        "eth0", "172.31.1.200", 32, ours=True)]]
    segment = SegmentClaims(lambda: reads[-1], interval=2.0)
    segment.derive(held("172.31.1.200"), NODE_IP)
    # not read yet: the egress IP looks off-segment, and a prune now would drop a past claim
    assert segment.table.all() == [] and not segment.table.initialized.is_set()
    clock, changed = ManualClock(), asyncio.Event()
    follower = asyncio.create_task(segment.follow(clock, changed))
    try:
        await eventually(changed.is_set)
        changed.clear()
        segment.derive(held("172.31.1.200"), NODE_IP)
        assert segment.table.all() == [ArpClaim("172.31.1.200", "eth0")]
        assert segment.table.initialized.is_set()
        assert segment.listing() == {"claimed": ["172.31.1.200 on eth0"], "leftAlone": []}
        # read again after the interval: a new address is news, our own claims are not
        reads.append([*reads[0], InterfaceAddress("eth0", "172.31.1.201", 32, ours=True)])
        await eventually(lambda: clock.waiters)
        clock.advance(2.0)
        await eventually(lambda: clock.waiters)
        assert not changed.is_set()
        reads.append([*reads[0], InterfaceAddress("eth1", "10.9.0.1", 24)])
        clock.advance(2.0)
        await eventually(changed.is_set)
    finally:
        follower.cancel()


def test_the_active_gateway_claims_an_egress_ip_of_its_segment(tmp_path: Path) -> None:
    eg, mf, _ = make_module(tmp_path / "e", LocalNode("east", 1, "n2", NODE_IP, "10.1.2.0/24"))
    eg.segment.addresses = (UPLINK,)
    mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db",
                       body(egressIP="172.31.1.200")))
    eg.recompute()
    assert [p.prefix for p in eg.hive.require(HOST_PREFIXES)] == ["172.31.1.200/32"]  # as before
    assert eg.segment.table.all() == [ArpClaim("172.31.1.200", "eth0")]
    listing = eg.listing()
    assert listing["datapath"]["arp"] == {"claimed": ["172.31.1.200 on eth0"], "leftAlone": []}
    listing["datapath"]["loaded"] = True  # as on a node whose datapath runs
    assert "claimed on this node's segment (gratuitous ARP): 172.31.1.200 on eth0" in render(listing)
    # the standby claims nothing while the preferred gateway is up
    standby, mf2, _ = make_module(tmp_path / "w", LocalNode("west", 2, "n2", "172.31.2.12",
                                                            "10.2.2.0/24"))
    standby.segment.addresses = (InterfaceAddress("eth0", "172.31.2.12", 16),)
    mf2.upsert(Manifest("east", "EgressGatewayPolicy", "default", "legacy-db",
                        body(egressIP="172.31.1.200")))
    standby.recompute()
    assert standby.segment.table.all() == []
    # an address someone put on the interface is shown, not claimed
    eg.segment.addresses = (UPLINK, InterfaceAddress("eth0", "172.31.1.200", 32))
    eg.recompute()
    assert eg.segment.table.all() == []
    listing = eg.listing()
    listing["datapath"]["loaded"] = True
    assert ("not claimed: 172.31.1.200 is an address of eth0 that this agent did not add"
            in render(listing))
    eg.segment.addresses = (UPLINK,)
    eg.recompute()
    assert eg.segment.table.all() == [ArpClaim("172.31.1.200", "eth0")]
    mf.delete(("east", "EgressGatewayPolicy", "default", "legacy-db"))
    eg.recompute()
    assert eg.segment.table.all() == []  # policy removed: the address is released

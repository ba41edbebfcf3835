"""The capture reader of the BGP restart tests: UPDATE bodies as ExaBGP sends them."""

from __future__ import annotations

import struct

from tests.bgp_wire import Session, Update, parse_update


def attr(code: int, value: bytes, flags: int = 0x40) -> bytes:
    return bytes([flags, code, len(value)]) + value


def update(withdrawn: bytes = b"", attrs: bytes = b"", nlri: bytes = b"") -> bytes:
    return struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", len(attrs)) + attrs + nlri


ORIGIN, NEXT_HOP = attr(1, b"\x00"), attr(3, bytes([10, 255, 0, 1]))


def test_updates_and_end_of_rib_of_both_families() -> None:
    assert parse_update(update()) == Update("ipv4", eor=True)
    routes = update(attrs=ORIGIN + NEXT_HOP, nlri=bytes([24, 10, 1, 1, 32, 10, 100, 0, 7]))
    assert parse_update(routes) == Update("ipv4", ("10.1.1.0/24", "10.100.0.7/32"))
    assert parse_update(update(withdrawn=bytes([24, 10, 1, 1]))) == Update("ipv4", withdrawn=("10.1.1.0/24",))
    nh6 = bytes.fromhex("fd000001000000000000000000000001")
    reach = struct.pack("!HBB", 2, 1, 16) + nh6 + b"\x00" + bytes([64]) + bytes.fromhex("fd00000100010000")
    assert parse_update(update(attrs=ORIGIN + attr(14, reach, 0x80))) == Update("ipv6", ("fd00:1:1::/64",))
    assert parse_update(update(attrs=attr(15, struct.pack("!HB", 2, 1), 0x80))) == Update("ipv6", eor=True)
    gone = struct.pack("!HB", 2, 1) + bytes([64]) + bytes.fromhex("fd00000100010000")
    assert parse_update(update(attrs=attr(15, gone, 0x80))) == Update("ipv6", withdrawn=("fd00:1:1::/64",))


def test_end_of_rib_must_follow_every_route_update() -> None:
    a, b, eor = Update("ipv4", ("10.0.0.1/32",)), Update("ipv4", ("10.0.0.2/32",)), Update("ipv4", eor=True)
    assert Session(1, [a, b, eor]).eor_after_routes()
    assert not Session(1, [a, eor, b]).eor_after_routes()
    assert not Session(1, [a, b]).eor_after_routes()
    assert Session(1, [eor]).eor_after_routes()  # nothing to announce
    assert not Session(1, [a, Update("ipv6", eor=True)]).eor_after_routes()
    assert Session(1, [a, b, eor]).announced() == {"10.0.0.1/32", "10.0.0.2/32"}

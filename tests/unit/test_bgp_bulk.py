"""The `plexus-bulk` ExaBGP command (bgp/launcher.py) against ExaBGP's own text commands:
ExaBGP's real parser, RIB and UPDATE encoder run in-process; only the wire is absent."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bgp.commands import (
    add_neighbors_command,
    announce_commands,
    bulk_commands,
    end_of_rib_commands,
    pack_prefixes,
    remove_neighbor_command,
    withdraw_commands,
)
from bgp.launcher import install_commands, parse_bulk
from bgp.render import render_config
from bgp.tables import IPNetwork, Neighbor, RouteAttrs

A = ipaddress.ip_address
N = ipaddress.ip_network
V4, V6 = A("10.0.0.2"), A("fd00::2")
CONFIG = """
neighbor 10.0.0.2 {
    router-id 10.0.0.1; local-address 10.0.0.1; local-as 65001; peer-as 65000;
    group-updates true;
    family { ipv4 unicast; }
}
neighbor fd00::2 {
    router-id 10.0.0.1; local-address fd00::1; local-as 65001; peer-as 65000;
    group-updates true;
    family { ipv4 unicast; ipv6 unicast; }
}
"""


class Speaker:
    """ExaBGP's configuration, API and scheduler, driven without a reactor loop."""

    def __init__(self, tmp: Path) -> None:
        from exabgp.configuration.configuration import Configuration
        from exabgp.environment import getenv
        from exabgp.logger import log
        from exabgp.reactor.api import API
        from exabgp.reactor.asynchronous import ASYNC
        from exabgp.rib import RIB

        env = getenv()
        env.log.level = "WARNING"  # not a line per route
        log.init(env)
        RIB._cache = {}  # ExaBGP shares a neighbor's RIB by name across configurations
        (tmp / "exabgp.conf").write_text(CONFIG)
        self.configuration = Configuration([str(tmp / "exabgp.conf")])
        assert self.configuration.reload(), self.configuration.error
        self.asynchronous = ASYNC()
        self.answers: list[str] = []
        self.processes = self
        self.api = API(self)
        self._peers: dict[str, Any] = {}  # the reactor's running peers
        self.established: set[str] = set()  # keys of the peers whose session is up
        assert install_commands()

    def peers(self, service: str) -> list[str]:
        return list(self.configuration.neighbors)

    def established_peers(self) -> set[str]:
        return self.established

    def answer_done(self, service: str) -> None:
        self.answers.append("done")

    def answer_error(self, service: str) -> None:
        self.answers.append("error")

    def run(self, commands: list[str]) -> list[str]:
        self.answers = []
        for c in commands:
            self.api.process(self, "plexus", c)
        while self.asynchronous.run():
            pass
        return self.answers

    def flush(self) -> dict[str, list[bytes]]:
        """The UPDATE messages each neighbor would send now."""
        from exabgp.configuration.check import _negotiated

        out = {}
        for n in self.configuration.neighbors.values():
            neg = _negotiated(n)
            out[str(n["peer-address"])] = [m for u in n.rib.outgoing.updates(True) for m in u.messages(neg)]
        return out

    def advertised(self) -> dict[str, set[tuple[str, str, str]]]:
        """What each neighbor's adj-rib-out holds: (prefix, next hop, attributes)."""
        return {str(n["peer-address"]): {(c.nlri.cidr.prefix(), str(c.nlri.nexthop), str(c.attributes))
                                         for c in n.rib.outgoing.cached_changes()}
                for n in self.configuration.neighbors.values()}


ATTRS = RouteAttrs(((65000, 100), (65000, 200)), ((65001, 1, 2),), 300)
STEPS: list[tuple[Any, list[IPNetwork], list[tuple[IPNetwork, RouteAttrs]]]] = [
    (V4, [], [(N(f"10.{i // 256}.{i % 256}.0/24"), ATTRS) for i in range(700)]
     + [(N("192.0.2.0/25"), RouteAttrs()), (N("0.0.0.0/0"), RouteAttrs(local_pref=5))]),
    (V4, [N("10.0.3.0/24"), N("10.1.0.0/24"), N("198.51.100.0/24")],  # the last was never announced
     [(N("10.0.4.0/24"), RouteAttrs(((1, 2),), (), None)), (N("10.9.9.9/32"), ATTRS)]),
    (V6, [], [(N("fd10::/64"), ATTRS), (N("fd10:0:0:1::/64"), ATTRS), (N("2001:db8::/32"), RouteAttrs()),
              (N("10.5.0.0/16"), ATTRS)]),
    (V6, [N("fd10::/64"), N("10.5.0.0/16")], [(N("2001:db8::/32"), RouteAttrs(local_pref=9))]),
]


def test_bulk_commands_send_what_the_text_commands_send(tmp_path: Path) -> None:
    """Step by step, the same UPDATE messages leave ExaBGP and the same routes stay in its
    adj-rib-out, whether the changes came as text or as `plexus-bulk`."""
    (tmp_path / "t").mkdir()
    (tmp_path / "b").mkdir()
    text, bulk = Speaker(tmp_path / "t"), Speaker(tmp_path / "b")
    for peer, gone, new in STEPS:
        t_cmds = withdraw_commands(peer, gone, 300) + announce_commands(peer, new, 300)
        b_cmds = bulk_commands(peer, gone, new, 300)
        assert len(b_cmds) == len(t_cmds)
        assert text.run(t_cmds) == ["done"] * len(t_cmds)
        assert bulk.run(b_cmds) == ["done"] * len(b_cmds)
        sent = bulk.flush()
        assert sent == text.flush()
        assert sent[str(peer)], "the step sent nothing"
        assert bulk.advertised() == text.advertised()
    held = {peer: {p: (nh, a) for p, nh, a in routes} for peer, routes in bulk.advertised().items()}
    v4, v6 = held["10.0.0.2"], held["fd00::2"]
    assert len(v4) == 700 + 2 - 2 + 1  # 10.0.4.0/24 was among the 700
    assert v4["10.0.0.0/24"] == ("10.0.0.1", " local-preference 300 community [ 65000:100 65000:200 ] "
                                             "large-community 65001:1:2")
    assert v4["10.0.4.0/24"] == ("10.0.0.1", " community 1:2")  # changed attributes replace the old
    assert v4["192.0.2.0/25"] == ("10.0.0.1", "") and "10.0.3.0/24" not in v4 and "10.1.0.0/24" not in v4
    assert v6 == {"fd10:0:0:1::/64": ("fd00::1", v4["10.0.0.0/24"][1]),
                  "2001:db8::/32": ("fd00::1", " local-preference 9")}


def test_last_command_for_a_prefix_wins_within_one_flush(tmp_path: Path) -> None:
    sp = Speaker(tmp_path)
    net = [(N("10.7.0.0/24"), ATTRS)]
    assert sp.run(bulk_commands(V4, [], net, 10) + bulk_commands(V4, [net[0][0]], [], 10)) == ["done", "done"]
    sp.flush()
    assert "10.7.0.0/24" not in {p for p, _, _ in sp.advertised()["10.0.0.2"]}
    assert sp.run(bulk_commands(V4, [net[0][0]], [], 10) + bulk_commands(V4, [], net, 10)) == ["done", "done"]
    (msg,) = sp.flush()["10.0.0.2"]
    assert msg.endswith(bytes([24, 10, 7, 0]))  # announced, not withdrawn after the announcement
    assert "10.7.0.0/24" in {p for p, _, _ in sp.advertised()["10.0.0.2"]}


@pytest.mark.parametrize("command", [
    "neighbor 10.0.0.2 plexus-bulk announce ipv4 !!! next-hop self",          # not base64
    "neighbor 10.0.0.2 plexus-bulk announce ipv4 " + pack_prefixes([N("fd00::/64")]),  # mask 64 > 32
    "neighbor 10.0.0.2 plexus-bulk announce ipv5 " + pack_prefixes([N("10.0.0.0/8")]),
    "neighbor 10.0.0.2 plexus-bulk replace ipv4 " + pack_prefixes([N("10.0.0.0/8")]),
    "neighbor 10.0.0.2 plexus-bulk announce ipv4 " + pack_prefixes([N("10.0.0.0/8")]) + " community [x]",
    "neighbor 10.0.0.2 plexus-bulk announce ipv6 " + pack_prefixes([N("fd00::/64")]),  # family not on peer
    "neighbor 10.0.0.9 plexus-bulk announce ipv4 " + pack_prefixes([N("10.0.0.0/8")]),  # no such peer
    "neighbor 10.0.0.2 plexus-bulk announce ipv4 AA== next-hop self",  # truncated: /0 fine, then nothing
])
def test_bad_bulk_commands_are_answered_error(tmp_path: Path, command: str) -> None:
    sp = Speaker(tmp_path)
    expected = "done" if command.endswith("AA== next-hop self") else "error"
    assert sp.run([command, "plexus-bulk"]) == [expected, "done"]  # and the next command still runs
    if expected == "error":
        assert sp.flush() == {"10.0.0.2": [], "fd00::2": []}


def test_packed_prefixes_round_trip() -> None:
    nets = [N("0.0.0.0/0"), N("10.0.0.0/8"), N("10.1.2.0/23"), N("10.1.2.3/32")]
    cmd = f"plexus-bulk announce ipv4 {pack_prefixes(nets)} local-preference 5"
    action, family, prefixes, attrs = parse_bulk(cmd)
    assert (action, family, attrs) == ("announce", "ipv4", "local-preference 5")
    assert [ipaddress.ip_network((bytes(p), m)) for p, m in prefixes] == nets
    v6 = [N("::/0"), N("fd00::/8"), N("2001:db8:1::/48"), N("2001:db8::1/128")]
    _, _, prefixes, attrs = parse_bulk(f"plexus-bulk withdraw ipv6 {pack_prefixes(v6)}")
    assert [ipaddress.ip_network((bytes(p), m)) for p, m in prefixes] == v6 and attrs == "next-hop self"


def test_neighbors_added_and_removed_leave_the_others_alone(tmp_path: Path) -> None:
    sp = Speaker(tmp_path)
    kept = [(N("10.7.0.0/24"), ATTRS)]
    assert sp.run(bulk_commands(V4, [], kept, 10)) == ["done"]
    sp.flush()
    third = ipaddress.IPv4Address("10.0.0.9")
    config = render_config([Neighbor(third, 65000, 65001, ipaddress.IPv4Address("10.0.0.1"),
                                      ipaddress.IPv4Address("10.0.0.1"), families=("ipv4",))],
                           {}, tmp_path / "api.sock", 10)

    def running() -> set[str]:
        return {str(n["peer-address"]) for n in sp.configuration.neighbors.values()}

    assert sp.run([add_neighbors_command(config)]) == ["done"]
    assert running() == {"10.0.0.2", "fd00::2", "10.0.0.9"} and len(sp._peers) == 1
    assert sp.run(bulk_commands(third, [], kept, 10)) == ["done"]  # the new peer takes routes
    assert {p for p, _, _ in sp.advertised()["10.0.0.9"]} == {"10.7.0.0/24"}
    assert {p for p, _, _ in sp.advertised()["10.0.0.2"]} == {"10.7.0.0/24"}
    assert sp.run([add_neighbors_command(config)]) == ["error"]  # it already runs
    assert sp.run([remove_neighbor_command(third)]) == ["done"]
    assert running() == {"10.0.0.2", "fd00::2"}
    assert {p for p, _, _ in sp.advertised()["10.0.0.2"]} == {"10.7.0.0/24"}  # untouched
    assert sp.run(["plexus-neighbor add !!!", "plexus-neighbor replace 10.0.0.2",
                   add_neighbors_command("neighbor 10.0.0.8 { nonsense; }")]) == ["error"] * 3
    assert running() == {"10.0.0.2", "fd00::2"}


def test_end_of_rib_goes_for_the_negotiated_families_only(tmp_path: Path) -> None:
    from exabgp.protocol.family import AFI, SAFI

    sp = Speaker(tmp_path)
    assert sp.run(["neighbor fd00::2 plexus-eor"]) == ["error"]  # no session up
    key = next(k for k, n in sp.configuration.neighbors.items() if str(n["peer-address"]) == "fd00::2")
    negotiated = SimpleNamespace(families=[(AFI.ipv4, SAFI.unicast)])  # ipv6 configured, not taken
    sp._peers[key] = SimpleNamespace(proto=SimpleNamespace(negotiated=negotiated))
    sp.established = {key}
    assert sp.run(["neighbor fd00::2 plexus-eor"]) == ["done"]
    assert [(f.afi, f.safi) for f in sp.configuration.neighbors[key].eor] == [(AFI.ipv4, SAFI.unicast)]
    assert end_of_rib_commands(V6, ("ipv4", "ipv6"), extended=True) == ["neighbor fd00::2 plexus-eor"]
    assert end_of_rib_commands(V6, ("ipv4", "ipv6")) == ["neighbor fd00::2 announce eor ipv4 unicast",
                                                         "neighbor fd00::2 announce eor ipv6 unicast"]


def test_a_prepended_path_leaves_exabgp_as_given(tmp_path: Path) -> None:
    sp = Speaker(tmp_path)
    net = [(N("10.255.0.10/32"), RouteAttrs(as_path=(65001, 65001, 65001)))]
    assert sp.run(bulk_commands(V4, [], net, 10)) == ["done"]
    assert sp.flush()["10.0.0.2"]
    held = {p: a for p, _, a in sp.advertised()["10.0.0.2"]}
    # ExaBGP prints an AS_SEQUENCE in parentheses (a set, which counts once, in brackets)
    assert held["10.255.0.10/32"] == " as-path ( 65001 65001 65001 )", held

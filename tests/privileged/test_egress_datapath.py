"""The egress gateway in the datapath, without an agent: a source node with pods, a gateway
node and an external server in namespaces, the maps filled by hand, real TCP.

    pods -- source node (from_pod: steer) ==VXLAN== gateway (uplink: SNAT) -- external server
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from bpf import attach
from bpf.egress import SnatEntry, SteeringEntry
from plexus.cni.ops import in_netns
from tests.egress_fixture import (
    EGRESS_IP,
    EXCLUDED_EXT,
    EXT,
    GATEWAY_NODE,
    SOURCE_NODE,
    Lab,
    ask,
    egress_path,
)
from tests.support import sh, stop_pid, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")  # bcc
COVERED, EXCLUDED = "198.51.100.0/24", "198.51.100.128/25"


@pytest.fixture
def lab(root: None) -> Iterator[Lab]:
    with egress_path() as path:
        yield path


def select(lab: Lab, pod: str, gateway: str | None = GATEWAY_NODE) -> None:
    ip = lab.pods[pod][1]
    lab.steering.steering_set(SteeringEntry(ip, COVERED, gateway))
    lab.steering.steering_set(SteeringEntry(ip, EXCLUDED, excluded=True))
    lab.snat.snat_set(SnatEntry(ip, COVERED, EGRESS_IP, source_node=SOURCE_NODE))  # replies: tunnel
    lab.snat.snat_set(SnatEntry(ip, EXCLUDED, None, excluded=True))  # routed via the gateway


def test_selected_pods_leave_through_the_gateway_with_the_egress_ip(lab: Lab) -> None:
    plain = ask(lab, "plain")
    assert plain.get("ip") == lab.pods["plain"][1], plain  # before any policy: its own address
    select(lab, "a")
    select(lab, "b")
    # two pods on one source port both get through: the gateway gives each its own port
    a, b = ask(lab, "a", sport=40000), ask(lab, "b", sport=40000)
    assert (a.get("ip"), b.get("ip")) == (EGRESS_IP, EGRESS_IP), (a, b)
    assert a["port"] != b["port"]
    assert {(c.pod, c.pod_port) for c in lab.snat.connections()} >= {
        (lab.pods["a"][1], 40000), (lab.pods["b"][1], 40000)}
    # unselected pod, excluded destination: their own addresses, as before
    assert ask(lab, "plain").get("ip") == lab.pods["plain"][1]
    assert ask(lab, "a", ip=EXCLUDED_EXT).get("ip") == lab.pods["a"][1]


def test_the_gateway_reports_each_translation_it_makes_as_a_flow(lab: Lab) -> None:
    events: list[dict[str, Any]] = []
    lab.gateway_dp.open_flows(events.append)
    select(lab, "a")
    answer = ask(lab, "a", sport=42000)
    assert answer.get("ip") == EGRESS_IP, answer
    wait_until(lambda: lab.gateway_dp.poll_flows(50) or any("nat" in e for e in events), 5,
               what="the translation's flow event")
    [made] = [e for e in events if "nat" in e]
    assert (made["src"], made["sport"], made["dst"], made["dport"]) == (
        lab.pods["a"][1], 42000, EXT, 8080)
    assert made["nat"] == (EGRESS_IP, answer["port"])  # what the server saw
    assert made["direction"] == 0 and made["verdict"] == 3


def test_a_ping_leaves_with_the_egress_ip_and_its_replies_come_back(lab: Lab) -> None:
    """ICMP echo is translated too: its identifier takes the place of the port."""
    select(lab, "a")
    dump = subprocess.Popen(["ip", "netns", "exec", lab.ext, "tcpdump", "-i", "eth0", "-n", "-l",
                             "-c", "3", "icmp[icmptype] == icmp-echo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        first = [dump.stderr.readline() for _ in range(2)]
        assert any("listening on" in line for line in first), first  # capturing before the echo
        r = sh("ping", "-c", "3", "-i", "0.2", "-W", "2", EXT, ns=lab.pods["a"][0], check=False)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        out, _ = dump.communicate(timeout=10)
    finally:
        stop_pid(dump)
    sources = {line.split(" IP ", 1)[1].split(" > ")[0] for line in out.splitlines() if " IP " in line}
    assert sources == {EGRESS_IP}, out  # the server saw only the egress IP
    pings = [c for c in lab.snat.connections() if c.proto == 1 and c.pod == lab.pods["a"][1]]
    assert [c.egress_ip for c in pings] == [EGRESS_IP], pings


def test_no_healthy_gateway_drops_and_counts_never_leaks(lab: Lab) -> None:
    select(lab, "a", gateway=None)
    before = lab.source_dp.drop_reasons()["no-egress-gateway"]
    answer = ask(lab, "a", timeout=1.0)
    assert "error" in answer, answer
    assert lab.source_dp.drop_reasons()["no-egress-gateway"] > before
    # the external server saw nothing of the pod nor of its node
    seen = sh("ip", "netns", "exec", lab.ext, sys.executable, "-c",
              "import urllib.request; print(urllib.request.urlopen("
              "'http://127.0.0.1:8081/clients').read().decode())").stdout
    assert json.loads(seen)["clients"] == []
    select(lab, "a")  # a gateway again: through it
    assert ask(lab, "a").get("ip") == EGRESS_IP


def test_a_gateway_without_the_translation_drops_what_is_steered_to_it(lab: Lab) -> None:
    """A source may steer before the gateway knows the pod (another cluster's agent was
    faster) or after the gateway dropped it: forwarded, the packet would leave with the
    pod's own address."""
    ip = lab.pods["a"][1]
    lab.steering.steering_set(SteeringEntry(ip, COVERED, GATEWAY_NODE))
    before = lab.gateway_dp.drop_reasons()["no-egress-gateway"]
    answer = ask(lab, "a", timeout=1.0)
    assert "error" in answer, answer
    assert lab.gateway_dp.drop_reasons()["no-egress-gateway"] > before
    assert clients(lab) == []
    lab.snat.snat_set(SnatEntry(ip, COVERED, EGRESS_IP, source_node=SOURCE_NODE))
    assert ask(lab, "a").get("ip") == EGRESS_IP  # the translation there: through, replies back


def clients(lab: Lab) -> list[Any]:
    seen = sh("ip", "netns", "exec", lab.ext, sys.executable, "-c",
              "import urllib.request; print(urllib.request.urlopen("
              "'http://127.0.0.1:8081/clients').read().decode())").stdout
    return list(json.loads(seen)["clients"])


def test_translations_outlive_the_program_that_made_them(lab: Lab) -> None:
    """A restarted agent loads the program again on the same pins: an open connection
    keeps its port of the egress IP and its replies still reach the pod."""
    from bpf.loader import Datapath

    select(lab, "a")
    server = subprocess.Popen(["ip", "netns", "exec", lab.pods["a"][0], sys.executable, "-c",
                               HOLD, EXT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None
        first = json.loads(server.stdout.readline())
        assert first["ip"] == EGRESS_IP, first
        again = Datapath(lab.pin / "gateway")
        with in_netns(f"/var/run/netns/{lab.gateway}"):
            attach.attach(lab.uplink, (again.egress_nat_out.fd, again.egress_nat_out.name),
                          (again.egress_nat_in.fd, again.egress_nat_in.name), uplink=True)
        server.stdin.write("more\n")
        server.stdin.flush()
        echoed = server.stdout.readline().strip()
        assert echoed == "more", echoed
    finally:
        stop_pid(server)
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()


def test_translations_age_like_conntrack_entries_and_are_swept(lab: Lab) -> None:
    """A closed connection's translation lives 10 s after its FIN, an open TCP one 6 hours
    idle: the sweep removes each when its time is up, both directions."""
    import time

    select(lab, "a")
    closed = ask(lab, "a", sport=41000)  # connects, reads its line, closes
    assert closed.get("ip") == EGRESS_IP, closed
    server = subprocess.Popen(["ip", "netns", "exec", lab.pods["a"][0], sys.executable, "-c",
                               HOLD, EXT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None
        assert json.loads(server.stdout.readline())["ip"] == EGRESS_IP
        pod = lab.pods["a"][1]

        def mine(now: int) -> dict[int, bool]:
            return {c.pod_port: c.closing for c in lab.snat.connections(now) if c.pod == pod}

        now = time.monotonic_ns()
        wait_until(lambda: mine(time.monotonic_ns()).get(41000), 5,
                   what="the closed connection's FIN marks its translation")
        held = [p for p in mine(now) if p != 41000]
        assert len(held) == 1 and mine(now)[held[0]] is False, mine(now)
        revnat = len(lab.snat.revnat)
        assert lab.snat.expire(now + 5 * 10**9) == 0            # nothing is due yet
        assert lab.snat.expire(now + 11 * 10**9) == 1           # the closed one, 10 s after
        assert mine(now) == {held[0]: False} and len(lab.snat.revnat) == revnat - 1
        server.stdin.write("still here\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "still here"  # the open one is untouched
        assert lab.snat.expire(now + (6 * 3600 + 1) * 10**9) == 1  # idle past 6 hours
        assert mine(now) == {} and len(lab.snat.revnat) == revnat - 2
    finally:
        stop_pid(server)
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()


# One connection to the external server kept open across the gateway's reload: prints what
# it was told, then what the server echoes of a line sent through the same connection.
HOLD = """import json, socket, sys
with socket.create_connection((sys.argv[1], 8080), timeout=5) as s:
    f = s.makefile("rw")
    print(f.readline().strip(), flush=True)
    line = sys.stdin.readline()
    f.write(line); f.flush()
    print(f.readline().strip(), flush=True)
"""

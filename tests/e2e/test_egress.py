"""The egress gateway in the lab: what the external server `plx-ext` sees of the pods."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from plexus.core.client import Client
from plexus.lab import ops
from plexus.lab.external import PORT
from plexus.lab.lab import Lab, State
from plexus.lab.topology import pod_netns
from tests.e2e.labs import apply_in, plexus, underlay_capture
from tests.support import wait_until

EXT_IP, EGRESS_IP = "198.51.100.10", "10.255.0.10"
VXLAN_PORT = 8472
MARKER = "PLEXUS-EGRESS-MARKER"
ASK = """import json, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""
POLICY = """apiVersion: plexus.io/v1
kind: EgressGatewayPolicy
metadata: {name: legacy-db}
spec:
  selectors:
  - podSelector: {matchLabels: {app: billing}}
  destinationCIDRs: [198.51.100.0/24]
  excludedCIDRs: EXCLUDED
  egressIP: 10.255.0.10
  egressGateways:
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: east}}
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2, io.cilium.k8s.policy.cluster: west}}
"""
BILLING = {"east": ("n1", "egbille"), "west": ("n1", "egbillw")}
# One connection kept open: the first line is what the server saw, then each line read from
# stdin is sent and its echo printed (an error instead when the connection broke).
KEEP = """import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        print(f.readline().decode().strip() or json.dumps({"error": "closed"}), flush=True)
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)
"""


def ask_external(lab: Lab, cluster: str, node: str, pod: str, timeout: float = 2.0) -> dict[str, Any]:
    """From a pod, one connection to the external server: the address it says it saw."""
    ns = pod_netns(lab.topo.node(cluster, node), pod)
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, EXT_IP, str(PORT),
                        str(timeout)], capture_output=True, text=True, timeout=timeout + 20)
    assert r.returncode == 0, r.stderr
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


class KeptConnection:
    """A TCP connection from a pod to the external server, open until `close`."""

    def __init__(self, lab: Lab, cluster: str, node: str, pod: str, timeout: float) -> None:
        ns = pod_netns(lab.topo.node(cluster, node), pod)
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", KEEP, EXT_IP,
                                      str(PORT), str(timeout)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.greeting: dict[str, Any] = json.loads(self.proc.stdout.readline() or "{}")

    def echo(self, text: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait(30)


def seen_as(lab: Lab, cluster: str, node: str, pod: str, want: str, timeout: float = 30) -> None:
    """Wait until the external server sees the pod's connections come from `want`."""
    last: list[dict[str, Any]] = []

    def ok() -> bool:
        last[:] = [ask_external(lab, cluster, node, pod)]
        return last[0].get("ip") == want

    try:
        wait_until(ok, timeout, interval=0.3)
    except AssertionError:
        listing = Client(lab.socket(lab.topo.node(cluster, node)), timeout=5).get("/v1/egress/list")
        raise AssertionError(f"{cluster}/{pod}: seen as {last}, not {want}; router: "
                             f"{lab.birdc('show', 'route')}; egress: {json.dumps(listing)}") from None


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Iterator[dict[str, dict[str, Any]]]:
    made = {"plain": lab.pod_add("east", "n1", "egplain", {"app": "plain"})}
    for cluster, (node, name) in BILLING.items():
        made[cluster] = lab.pod_add(cluster, node, name, {"app": "billing"})
    try:
        yield made
    finally:
        for p in made.values():
            lab.pod_del(p["cluster"], p["node"], p["pod"])


def test_a_pod_no_policy_selects_reaches_the_external_server_with_its_own_address(
        lab: Lab, pods: dict[str, dict[str, Any]]) -> None:
    before = len(lab.external_clients())
    answer = ask_external(lab, "east", "n1", "egplain")
    assert answer.get("ip") == pods["plain"]["ip"], answer
    seen = lab.external_clients(since=before)
    assert [c["ip"] for c in seen] == [pods["plain"]["ip"]]


def selecting(lab: Lab) -> bool:
    """Every source node's agent selects its billing pod."""
    return all(any(p["name"] == "east/default/legacy-db" and p["endpoints"]
                   for p in Client(lab.socket(lab.topo.node(c, n)), timeout=5)
                   .get("/v1/egress/list")["policies"])
               for c, (n, _pod) in BILLING.items())


def test_selected_pods_of_both_clusters_leave_with_the_egress_ip_and_removal_restores(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # the destination excluded: the pods keep their own addresses
    r = apply_in("east", POLICY.replace("EXCLUDED", "[198.51.100.10/32]"), tmp_path)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: selecting(lab), 30, interval=0.3,
               what="every source node to select the billing pods")
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, pods[cluster]["ip"])
    # covered: through east/n2, which announces the egress IP to the router
    policy = POLICY.replace("EXCLUDED", "[]")
    r = apply_in("east", policy, tmp_path)
    assert r.returncode == 0, r.stderr
    before = len(lab.external_clients())
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, EGRESS_IP)
    assert ask_external(lab, "east", "n1", "egplain").get("ip") == pods["plain"]["ip"]
    billing = {pods[c]["ip"] for c in BILLING}
    seen = {c["ip"] for c in lab.external_clients(since=before)}
    assert not seen & billing, seen  # once steered, never seen with their own address
    route = lab.birdc("show", "route", f"{EGRESS_IP}/32", "all")
    assert lab.topo.node("east", "n2").host.ip in route, route
    # the gateway shows each translation as a flow: the pod, the policy, the egress IP
    r = plexus("observe", "--node", "east-n2", "--type", "egress-gateway", "--from-ip",
               pods["west"]["ip"], "--last", "50", "-o", "json")
    assert r.returncode == 0, r.stderr
    flows = [json.loads(line)["flow"] for line in r.stdout.splitlines() if line.strip()]
    assert flows, r.stdout
    assert {(f["source"].get("pod_name"), f["egress_gateway"]["policy"],
             f["egress_gateway"]["egress_ip"], f["egress_gateway"]["gateway"]) for f in flows} == {
        ("egbillw", "east/default/legacy-db", EGRESS_IP, "east/n2")}
    # the policy removed: normal routing, the egress IP withdrawn
    f = tmp_path / "policy.yaml"
    f.write_text(policy)
    r = plexus("delete", "-f", str(f), "--lab", "east")
    assert r.returncode == 0, r.stderr
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, pods[cluster]["ip"])
    forgotten(lab)


def best_route_via(lab: Lab, prefix: str) -> str:
    """The next hop of the router's best route to `prefix` ('' when it has none)."""
    lines = lab.birdc("show", "route", prefix, "primary").splitlines()
    via = [line.split("via", 1)[1].split()[0] for line in lines if "via" in line]
    return via[0] if via else ""


def test_the_standby_takes_over_a_dead_gateway_and_the_external_server_sees_the_same_ip(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    active, standby = lab.topo.node("east", "n2"), lab.topo.node("west", "n2")
    f = applied(tmp_path, POLICY.replace("EXCLUDED", "[]"))
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, EGRESS_IP)
    assert best_route_via(lab, f"{EGRESS_IP}/32") == active.host.ip
    agent = State.load(lab.state_path).processes[f"agent-{active.key}"]
    try:
        # the node gone: no probe answered, no TCP segment reaches the router (its BGP
        # session ends only when the router's hold timer, 9 s, runs out)
        ops.run("ip", "-n", active.host.netns, "link", "set", "eth0", "down")
        ops.stop(agent.pid, agent.marker, timeout=5)
        # well before that hold timer: the standby's route wins at once
        for cluster, (node, pod) in BILLING.items():
            seen_as(lab, cluster, node, pod, EGRESS_IP, timeout=6)
        assert best_route_via(lab, f"{EGRESS_IP}/32") == standby.host.ip
        # Seen from east/n1: west/n1's own probes (from its record) and east's control plane
        # (the apiserver probes its nodes) both say so.
        client = Client(lab.socket(lab.topo.node("east", "n1")), timeout=5)
        last: list[Any] = []

        def known_everywhere() -> bool:
            listing = last[:] = [client.get("/v1/egress/list")]
            [policy] = [p for p in listing[0]["policies"] if p["name"] == "east/default/legacy-db"]
            active = {a["sourceNode"]: (a["gateway"], a["healthFrom"]) for a in policy["active"]}
            control = [h for h in listing[0]["health"]
                       if h["reporter"] == "control-plane" and h["gateway"] == "east/n2"]
            return (active == {"east/n1": ("west/n2", "this node's probes"),
                               "west/n1": ("west/n2", "its node's probes")}
                    and bool(control) and not control[0]["healthy"])

        wait_until(known_everywhere, 15, interval=0.3,
                   what=lambda: f"the failover known on east/n1: {json.dumps(last)}")
    finally:
        restore(lab, f, active)
    forgotten(lab)


def test_cilium_interface_form_leaves_with_the_gateways_interface_address(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    gateway = lab.topo.node("east", "n2")
    f = applied(tmp_path, POLICY.replace("EXCLUDED", "[]").replace("  egressIP: 10.255.0.10\n", "")
                .replace("io.cilium.k8s.policy.cluster: east}}",
                         "io.cilium.k8s.policy.cluster: east}}\n    interface: eth0"))
    try:
        for cluster, (node, pod) in BILLING.items():
            seen_as(lab, cluster, node, pod, gateway.host.ip)
        client = Client(lab.socket(lab.topo.node("west", "n1")), timeout=5)
        wait_until(lambda: [(g["node"], g["egressIP"]) for p in client.get("/v1/egress/list")["policies"]
                            for g in p["gateways"]][:1] == [("east/n2", gateway.host.ip)], 15,
                   interval=0.3, what="west/n1 to learn east/n2's eth0 address from its record")
    finally:
        r = plexus("delete", "-f", str(f), "--lab", "east")
        assert r.returncode == 0, r.stderr
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, pods[cluster]["ip"])


def applied(tmp_path: Path, text: str) -> Path:
    """The policy `text` applied in east; its file, to delete it by."""
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    r = plexus("apply", "-f", str(f), "--lab", "east")
    assert r.returncode == 0, r.stderr
    return f


def forgotten(lab: Lab) -> None:
    """Wait for the router to drop its route to the egress IP (the policy gone)."""
    wait_until(lambda: EGRESS_IP not in lab.birdc("show", "route"), 30, interval=0.3,
               what="the router to forget the egress IP")


def restore(lab: Lab, policy: Path, *downed: Any) -> None:
    """After a test took gateways down: their links up, their agents started again (`lab
    up`), the policy deleted."""
    for gw in downed:
        ops.run("ip", "-n", gw.host.netns, "link", "set", "eth0", "up")
    r = plexus("lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    r = plexus("delete", "-f", str(policy), "--lab", "east")
    assert r.returncode == 0, r.stderr


def drops(lab: Lab, cluster: str, node: str, reason: str) -> float:
    n = lab.topo.node(cluster, node)
    text = ops.run(sys.executable, "-c", "import urllib.request;print(urllib.request.urlopen("
                   f"'http://{n.host.ip}:9962/metrics').read().decode())", ns=n.host.netns).stdout
    found = re.search(rf'^plexus_datapath_drops_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


@contextmanager
def router_capture(lab: Lab) -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """tcpdump on every interface of the router toward the external network; yields a reader
    of the (source, destination) addresses of what it saw."""
    path = lab.root / "egress-leak.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", "plx-router", "tcpdump", "--immediate-mode",
                             "-Z", "root", "-i", "any", "-n", "-U", "-w", str(path),
                             "dst net 198.51.100.0/24"], stderr=subprocess.DEVNULL)

    def read() -> list[tuple[str, str]]:
        out = subprocess.run(["tcpdump", "-r", str(path), "-n"], capture_output=True, text=True).stdout
        pairs = re.findall(r" IP (\d+\.\d+\.\d+\.\d+)\.\d+ > (\d+\.\d+\.\d+\.\d+)\.\d+", out)
        return [(a, b) for a, b in pairs]

    try:
        # a packet of the unselected pod shows that it captures
        wait_until(lambda: ask_external(lab, "east", "n1", "egplain", 1.0).get("ip") is not None
                   and any(a != EGRESS_IP for a, _ in read()), 15, interval=0.3,
                   what="tcpdump capturing on the router")
        yield read
    finally:
        dump.terminate()
        dump.wait(10)
        path.unlink(missing_ok=True)


def test_with_every_gateway_down_selected_traffic_is_dropped_and_never_leaks(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    gateways = [lab.topo.node("east", "n2"), lab.topo.node("west", "n2")]
    f = applied(tmp_path, POLICY.replace("EXCLUDED", "[]"))
    for cluster, (node, pod) in BILLING.items():
        seen_as(lab, cluster, node, pod, EGRESS_IP)
    agents = State.load(lab.state_path).processes
    before = {c: drops(lab, c, n, "no-egress-gateway") for c, (n, _pod) in BILLING.items()}
    try:
        for gw in gateways:
            ops.run("ip", "-n", gw.host.netns, "link", "set", "eth0", "down")
            agent = agents[f"agent-{gw.key}"]
            ops.stop(agent.pid, agent.marker, timeout=5)
        with router_capture(lab) as seen:
            for cluster, (node, pod) in BILLING.items():
                def dropped(c: str = cluster, n: str = node, p: str = pod) -> bool:
                    return ("error" in ask_external(lab, c, n, p, 1.0)
                            and drops(lab, c, n, "no-egress-gateway") > before[c])

                wait_until(dropped, 30, interval=0.3,
                           what=f"{cluster}/{pod}'s connections dropped on its node")
            plain = ask_external(lab, "east", "n1", "egplain", 1.0)
            assert plain.get("ip") == pods["plain"]["ip"], plain  # not selected: leaves as before
            captured = seen()
        own = {pods[c]["ip"] for c in BILLING} | {n.host.ip for n in lab.topo.nodes()}
        assert pods["plain"]["ip"] in {a for a, _ in captured}, captured  # the capture works
        leaked = [(a, b) for a, b in captured if a in own or a == EGRESS_IP]
        assert not leaked, leaked
    finally:
        restore(lab, f, *gateways)
    forgotten(lab)


def test_a_gateway_agent_restarted_under_traffic_keeps_established_connections(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    gateway = lab.topo.node("east", "n2")
    f = applied(tmp_path, POLICY.replace("EXCLUDED", "[]"))
    node, pod = BILLING["east"]
    seen_as(lab, "east", node, pod, EGRESS_IP)
    before = len(lab.external_clients())
    # retransmissions must carry the connection over the restart: a long read timeout
    kept = KeptConnection(lab, "east", node, pod, timeout=30)
    try:
        assert kept.greeting.get("ip") == EGRESS_IP, kept.greeting
        assert kept.echo("before the restart") == "before the restart"
        agent = State.load(lab.state_path).processes[f"agent-{gateway.key}"]
        os.kill(agent.pid, signal.SIGKILL)  # a PID the lab recorded: ours
        wait_until(lambda: not ops.alive(agent.pid, agent.marker), 10, what="the agent gone")
        assert kept.echo("while the agent is gone") == "while the agent is gone"
        r = plexus("lab", "up")  # starts the agent again
        assert r.returncode == 0, r.stdout + r.stderr
        restarted = State.load(lab.state_path).processes[f"agent-{gateway.key}"]
        assert restarted.pid != agent.pid

        def translating() -> bool:
            listing = Client(lab.socket(gateway), timeout=5).get("/v1/egress/list")
            return bool(listing["datapath"]["loaded"] and listing["datapath"]["snat"]
                        and f"{EGRESS_IP}/32" in listing["datapath"]["announced"])

        wait_until(translating, 30, interval=0.3, what="the restarted agent's egress datapath")
        assert kept.echo("after the restart") == "after the restart"
        seen_as(lab, "east", node, pod, EGRESS_IP)  # and new connections too
    finally:
        kept.close()
        r = plexus("delete", "-f", str(f), "--lab", "east")
        assert r.returncode == 0, r.stderr
    # one connection of the kept ones, and every address the server saw is the egress IP
    seen = lab.external_clients(since=before)
    assert seen and {c["ip"] for c in seen} == {EGRESS_IP}, seen
    assert kept.greeting.get("seq") in {c["seq"] for c in seen}
    forgotten(lab)


def packets_with(text: str, marker: str) -> list[str]:
    """The header lines of the captured packets (tcpdump -A) whose bytes hold `marker`."""
    found: list[str] = []
    header, body = "", list[str]()
    for line in [*text.splitlines(), "00:00:00.000000 end"]:
        if re.match(r"\d\d:\d\d:\d\d\.\d+ ", line):
            if marker in "".join(body):
                found.append(header)
            header, body = line, []
        else:
            body.append(line.strip())
    return found


def frag_creates(lab: Lab, cluster: str, node: str) -> int:
    """IP fragments the node's namespace made (a tunnel packet too big for WireGuard's MTU)."""
    text = ops.run("cat", "/proc/net/snmp", ns=lab.topo.node(cluster, node).host.netns).stdout
    names, values = [line.split()[1:] for line in text.splitlines() if line.startswith("Ip:")][:2]
    return int(values[names.index("FragCreates")])


def test_the_tunnel_to_the_gateway_goes_inside_wireguard(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    f = applied(tmp_path, POLICY.replace("EXCLUDED", "[]"))
    node, pod = BILLING["east"]
    try:
        seen_as(lab, "east", node, pod, EGRESS_IP)
        # the pod's MTU leaves room for VXLAN (50 bytes) inside WireGuard (80)
        link = json.loads(ops.run("ip", "-j", "-n", pod_netns(lab.topo.node("east", node), pod),
                                  "link", "show", "eth0").stdout)
        assert link[0]["mtu"] == 1500 - 80 - 50, link
        fragments = frag_creates(lab, "east", node)
        with underlay_capture(lab, "egress-tunnel") as read:
            kept = KeptConnection(lab, "east", node, pod, timeout=10)
            try:
                assert kept.greeting.get("ip") == EGRESS_IP, kept.greeting
                for i in range(5):
                    assert kept.echo(f"{MARKER}-{i}") == f"{MARKER}-{i}"
                # full-sized segments get through, none of them fragmented on the way
                big = f"{MARKER}-big-" + "x" * 20000
                assert kept.echo(big) == big
            finally:
                kept.close()
        assert frag_creates(lab, "east", node) == fragments
        text, headers = read()
    finally:
        r = plexus("delete", "-f", str(f), "--lab", "east")
        assert r.returncode == 0, r.stderr
    assert f".{VXLAN_PORT}: " not in headers, [h for h in headers.splitlines()
                                                 if f".{VXLAN_PORT}: " in h][:5]
    # in the clear only beyond the gateway: from the egress IP to the server and back
    clear = packets_with(text, MARKER)
    assert clear, "the capture saw the server's leg"
    assert all(f" IP {EGRESS_IP}." in h or f" IP {EXT_IP}." in h for h in clear), clear[:5]
    forgotten(lab)


SEGMENT_EGRESS_IP = "172.31.1.200"  # on east's segment: its hosts ARP for it


def segment_neighbour(lab: Lab, host: str) -> str:
    """The MAC `host` (a namespace on east's segment) has for the segment's egress IP."""
    out = ops.run("ip", "-j", "neigh", "show", SEGMENT_EGRESS_IP, ns=host).stdout
    found = json.loads(out) if out.strip() else []
    return str(found[0].get("lladdr", "")) if found else ""


def claimed_on(lab: Lab, node: str) -> bool:
    host = lab.topo.node("east", node).host
    out = json.loads(ops.run("ip", "-j", "-4", "addr", "show", "dev", "eth0", ns=host.netns).stdout)
    return any(a["local"] == SEGMENT_EGRESS_IP for link in out for a in link["addr_info"])


def mac_of(lab: Lab, node: str) -> str:
    host = lab.topo.node("east", node).host
    return str(json.loads(ops.run("ip", "-j", "link", "show", "eth0", ns=host.netns).stdout)[0]
               ["address"])


def test_an_egress_ip_of_the_gateways_segment_is_claimed_by_arp_and_follows_a_failover(
        lab: Lab, pods: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # The router learns the /32 over BGP and routes it to the gateway's node address; the
    # segment's other hosts (the control plane here) ask for it with ARP.
    segment_host = lab.topo.clusters[0].control_plane.netns
    active, standby = lab.topo.node("east", "n2"), lab.topo.node("east", "n1")
    f = tmp_path / "policy.yaml"
    f.write_text(POLICY.replace("EXCLUDED", "[]").replace(EGRESS_IP, SEGMENT_EGRESS_IP)
                 .replace("hostname: n2, io.cilium.k8s.policy.cluster: west",
                          "hostname: n1, io.cilium.k8s.policy.cluster: east"))
    r = plexus("apply", "-f", str(f), "--lab", "east")
    assert r.returncode == 0, r.stderr
    agent = State.load(lab.state_path).processes[f"agent-{active.key}"]
    try:
        for cluster, (node, pod) in BILLING.items():
            seen_as(lab, cluster, node, pod, SEGMENT_EGRESS_IP)
        wait_until(lambda: claimed_on(lab, "n2"), 10, interval=0.2, what="n2 claims the address")
        assert not claimed_on(lab, "n1")
        listing = Client(lab.socket(active), timeout=5).get("/v1/egress/list")
        assert listing["datapath"]["arp"]["claimed"] == [f"{SEGMENT_EGRESS_IP} on eth0"], listing
        ops.run("ping", "-c1", "-W2", SEGMENT_EGRESS_IP, ns=segment_host)
        assert segment_neighbour(lab, segment_host) == mac_of(lab, "n2")
        # n2 gone: n1 claims the address, and its announcement alone moves the host's entry
        ops.run("ip", "-n", active.host.netns, "link", "set", "eth0", "down")
        ops.stop(agent.pid, agent.marker, timeout=5)
        wait_until(lambda: segment_neighbour(lab, segment_host) == mac_of(lab, "n1"), 6,
                   interval=0.1, what=lambda: f"the segment host's entry follows n1's "
                   f"announcement: {segment_neighbour(lab, segment_host)}")
        assert claimed_on(lab, "n1")
        ops.run("ping", "-c1", "-W2", SEGMENT_EGRESS_IP, ns=segment_host)
        seen_as(lab, "east", *BILLING["east"], SEGMENT_EGRESS_IP, timeout=6)
        assert best_route_via(lab, f"{SEGMENT_EGRESS_IP}/32") == standby.host.ip
    finally:
        restore(lab, f, active)
    # the policy removed: every gateway releases the address
    wait_until(lambda: not claimed_on(lab, "n1") and not claimed_on(lab, "n2"), 30,
               interval=0.3, what="the gateways to release the segment's egress IP")

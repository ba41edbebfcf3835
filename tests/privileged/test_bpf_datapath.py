"""The datapath program on real traffic, IPv6 and IPv4 alike.

Two network namespaces joined by a veth: "pod" holds one end, "node" the other with the
program attached to it as the agent attaches it to a pod's host-side veth (from_pod at tc
ingress, to_pod at tc egress). The node end carries several addresses, each with its own
identity in the ipcache, so the same peer namespace is an allowed and a denied client.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bpf import attach
from bpf.loader import CT_CLOSE_S, CT_LIFETIME_TCP_S, Datapath, ct_lifetime
from bpf.policy import ALLOW, DENY, EGRESS, INGRESS
from tests.support import eventually, netns, sh, stop_pid, unique

# bcc wants bytes for names and program text and says so once per call
pytestmark = pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
CLONE_NEWNET = 0x40000000
TCP, ANY = 6, 0
ALLOWED, DENIED, RANGE = 131300, 131301, 131302   # identities of the node end's addresses

ECHO = r"""
import socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if mode == "serve":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            c.sendall(c.recv(1024))
        except OSError:
            pass
        c.close()
else:  # connect from a given source address, send, expect the echo
    s.settimeout(float(sys.argv[5]))
    s.bind((sys.argv[4], 0))
    s.connect((addr, port))
    s.sendall(b"plexus")
    sys.exit(0 if s.recv(1024) == b"plexus" else 3)
"""


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread's netlink calls in namespace `ns` (the program is global, tc is not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        yield
    finally:
        if libc.setns(own, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(own)
        os.close(target)


@dataclass
class Family:
    name: str
    prefixlen: int
    pod: str                 # the pod's address
    node: tuple[str, ...]    # the node end's addresses: ALLOWED, DENIED, and one only RANGE covers
    range: str               # a prefix covering all of them

    def host(self, ip: str) -> str:
        return f"{ip}/{128 if ':' in ip else 32}"


FAMILIES = [
    Family("ipv6", 64, "fd00:a::5", ("fd00:a::1", "fd00:a::2", "fd00:a::3"), "fd00:a::/64"),
    Family("ipv4", 24, "10.200.0.5", ("10.200.0.1", "10.200.0.2", "10.200.0.3"), "10.200.0.0/24"),
]


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    if os.geteuid() != 0:
        pytest.fail("privileged tests need root (network namespaces, BPF, tc)")
    pin = Path(f"/sys/fs/bpf/plexus-test-{secrets.token_hex(3)}")
    try:
        datapath = Datapath(pin)
        yield datapath
        # close the perf buffers now: at exit bcc would close them after their map, and complain
        for name in ("flows", "flows6"):
            table = datapath.bpf[name]
            for cpu in list(table._open_key_fds):
                del table[cpu]
    finally:
        shutil.rmtree(pin, ignore_errors=True)


@pytest.fixture(scope="module")
def flows(dp: Datapath) -> list[dict[str, Any]]:
    """Every verdict event the program reports (both families), once dp.poll_flows delivers."""
    seen: list[dict[str, Any]] = []
    dp.open_flows(seen.append)
    return seen


@dataclass
class Link:
    pod: str       # namespace names
    node: str
    ifindex: int   # of the node end, where the program runs


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> Family:
    param: Family = request.param
    return param


@pytest.fixture
def link(dp: Datapath, family: Family) -> Iterator[Link]:
    with netns("plx-tbp") as pod, netns("plx-tbn") as node:
        host_if, pod_if = unique("plxh"), unique("plxp")
        sh("ip", "link", "add", host_if, "netns", node, "type", "veth", "peer", "name", pod_if,
           "netns", pod)
        v6 = family.name == "ipv6"
        extra = ["nodad"] if v6 else []  # no duplicate detection: usable at once
        sh("ip", "addr", "add", f"{family.pod}/{family.prefixlen}", "dev", pod_if, *extra, ns=pod)
        for ip in family.node:
            sh("ip", "addr", "add", f"{ip}/{family.prefixlen}", "dev", host_if, *extra, ns=node)
        sh("ip", "link", "set", pod_if, "up", ns=pod)
        sh("ip", "link", "set", host_if, "up", ns=node)
        with inside(node):
            idx = attach.attach(host_if, (dp.from_pod.fd, dp.from_pod.name),
                                (dp.to_pod.fd, dp.to_pod.name))
        yield Link(pod, node, idx)
        for prefix in [family.range, *(family.host(ip) for ip in family.node)]:
            dp.ipcache_delete(prefix)
        for item in dp.policy_items():
            if item[0] == idx:
                dp.policy_delete(*item[:5])
        for d in (INGRESS, EGRESS):
            dp.enforce_delete(idx, d)


@contextmanager
def server(ns: str, addr: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO, "serve", addr,
                             str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        stop_pid(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def connects(ns: str, src: str, dst: str, port: int, timeout: float = 1.5) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO, "connect", dst,
                        str(port), src, str(timeout)], capture_output=True, timeout=timeout + 15)
    return r.returncode == 0


def pings(ns: str, src: str, dst: str) -> bool:
    flag = "-6" if ":" in dst else "-4"
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", flag, "-c", "1", "-W", "1", "-I", src, dst],
                       capture_output=True, timeout=15)
    return r.returncode == 0


def test_ipcache_maps_hold_both_families(dp: Datapath) -> None:
    dp.ipcache_set("fd00:b::7/128", 131400, "172.31.2.11", 1)
    dp.ipcache_set("fd00:b::/48", 131401, "fd00:31::2", 0)
    dp.ipcache_set("10.201.0.7/32", 131402, "172.31.2.11", 1)
    try:
        items = dp.ipcache_items()
        assert items["fd00:b::7/128"] == (131400, "172.31.2.11", 1)  # an IPv4 host, unmapped
        assert items["fd00:b::/48"] == (131401, "fd00:31::2", 0)
        assert items["10.201.0.7/32"] == (131402, "172.31.2.11", 1)
    finally:
        for p in ("fd00:b::7/128", "fd00:b::/48", "10.201.0.7/32"):
            dp.ipcache_delete(p)
    assert not {"fd00:b::7/128", "fd00:b::/48", "10.201.0.7/32"} & dp.ipcache_items().keys()


def test_policy_by_identity_on_real_tcp(dp: Datapath, flows: list[dict[str, Any]], family: Family,
                                        link: Link) -> None:
    allowed_ip, denied_ip, range_ip = family.node
    dp.ipcache_set(family.host(allowed_ip), ALLOWED, "", 0)
    dp.ipcache_set(family.host(denied_ip), DENIED, "", 0)
    dp.ipcache_set(family.range, RANGE, "", 0)  # range_ip has no entry of its own: longest prefix
    flows.clear()

    with server(link.pod, family.pod, 8080), server(link.pod, family.pod, 8081):
        # Nothing enforced: the pod is open to everyone.
        assert connects(link.node, denied_ip, family.pod, 8080)

        # Ingress enforced: ALLOWED on TCP 8080, the range on anything, DENIED denied
        # although an allow names it too (deny beats allow).
        dp.policy_set(link.ifindex, ALLOWED, 8080, TCP, INGRESS, ALLOW)
        dp.policy_set(link.ifindex, RANGE, 0, ANY, INGRESS, ALLOW)
        dp.policy_set(link.ifindex, DENIED, 8080, TCP, INGRESS, ALLOW)
        dp.policy_set(link.ifindex, DENIED, 0, ANY, INGRESS, DENY)
        dp.enforce_set(link.ifindex, INGRESS)
        assert connects(link.node, allowed_ip, family.pod, 8080)
        assert not connects(link.node, allowed_ip, family.pod, 8081)   # not its port
        assert not connects(link.node, denied_ip, family.pod, 8080)    # deny beats allow
        assert connects(link.node, range_ip, family.pod, 8081)         # by its prefix's identity
        # ICMP(v6) has no ports: only a protocol-any rule lets it in
        assert pings(link.node, range_ip, family.pod)
        assert not pings(link.node, allowed_ip, family.pod)

        # The address changes identity: its next connection is judged by the new one.
        dp.ipcache_set(family.host(denied_ip), ALLOWED, "", 0)
        assert connects(link.node, denied_ip, family.pod, 8080)

    # Egress enforced: the pod reaches ALLOWED on 9090 only.
    dp.ipcache_set(family.host(denied_ip), DENIED, "", 0)
    dp.policy_set(link.ifindex, ALLOWED, 9090, TCP, EGRESS, ALLOW)
    dp.enforce_set(link.ifindex, EGRESS)
    with server(link.node, "::" if family.name == "ipv6" else "0.0.0.0", 9090):
        assert connects(link.pod, family.pod, allowed_ip, 9090)
        assert not connects(link.pod, family.pod, denied_ip, 9090)

    # Every new verdict was reported with its addresses and the peer's identity.
    deadline = time.monotonic() + 5
    want = {"src": denied_ip, "dst": family.pod, "dport": 8080, "proto": TCP,
            "identity": DENIED, "verdict": DENY, "direction": INGRESS}
    while time.monotonic() < deadline and not any(want.items() <= f.items() for f in flows):
        dp.poll_flows(100)
    assert any(want.items() <= f.items() for f in flows), flows[-5:]


HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("connected", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_two_pods_on_one_node_each_enforce_their_own_policy(dp: Datapath, v6: bool) -> None:
    """A connection one pod's egress lets out is judged again by the other pod's ingress: the
    first veth's conntrack entry must not let it past the second one's policy."""
    a_ip, b_ip, a_gw, b_gw, plen = (("fd00:c1::5", "fd00:c2::5", "fd00:c1::1", "fd00:c2::1", 64) if v6 else
                                    ("10.203.1.5", "10.203.2.5", "10.203.1.1", "10.203.2.1", 24))
    host = 128 if v6 else 32
    a_id, b_id = 131500, 131501
    with netns("plx-tba") as pod_a, netns("plx-tbb") as pod_b, netns("plx-tbn") as node:
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1" if v6 else "net.ipv4.ip_forward=1", ns=node)
        idx = {}
        for pod, ip, gw in ((pod_a, a_ip, a_gw), (pod_b, b_ip, b_gw)):
            host_if, pod_if = unique("plxh"), unique("plxp")
            sh("ip", "link", "add", host_if, "netns", node, "type", "veth", "peer", "name", pod_if,
               "netns", pod)
            extra = ["nodad"] if v6 else []
            sh("ip", "addr", "add", f"{ip}/{plen}", "dev", pod_if, *extra, ns=pod)
            sh("ip", "addr", "add", f"{gw}/{plen}", "dev", host_if, *extra, ns=node)
            sh("ip", "link", "set", pod_if, "up", ns=pod)
            sh("ip", "link", "set", host_if, "up", ns=node)
            sh("ip", "-6" if v6 else "-4", "route", "add", "default", "via", gw, ns=pod)
            with inside(node):
                idx[pod] = attach.attach(host_if, (dp.from_pod.fd, dp.from_pod.name),
                                         (dp.to_pod.fd, dp.to_pod.name))
        dp.ipcache_set(f"{a_ip}/{host}", a_id, "", 0)
        dp.ipcache_set(f"{b_ip}/{host}", b_id, "", 0)
        try:
            with server(pod_b, b_ip, 8080):
                assert connects(pod_a, a_ip, b_ip, 8080, timeout=3)  # nobody selected
                # B's ingress selected with no rule for A: A's egress (open) does not decide it
                dp.enforce_set(idx[pod_b], INGRESS)
                assert not connects(pod_a, a_ip, b_ip, 8080)
                dp.policy_set(idx[pod_b], a_id, 8080, TCP, INGRESS, ALLOW)
                assert connects(pod_a, a_ip, b_ip, 8080)
                # and A's egress, once selected, needs its own rule for B, replies included
                dp.enforce_set(idx[pod_a], EGRESS)
                assert not connects(pod_a, a_ip, b_ip, 8080)
                dp.policy_set(idx[pod_a], b_id, 8080, TCP, EGRESS, ALLOW)
                assert connects(pod_a, a_ip, b_ip, 8080)
                # an open TCP connection may idle for hours; a closed one's entries go in seconds
                held = subprocess.Popen(["ip", "netns", "exec", pod_a, sys.executable, "-c", HOLD, b_ip,
                                         "8080"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                try:
                    assert held.stdout is not None and held.stdout.readline().strip() == "connected"
                    lifetimes = {ct_lifetime(proto, flags) for i, d, _s, _d, _sp, dport, proto, _seen, flags
                                 in dp.ct_items() if (i, d, dport, proto) == (idx[pod_a], EGRESS, 8080, TCP)}
                finally:
                    stop_pid(held)
                    for pipe in (held.stdin, held.stdout):
                        if pipe is not None:
                            pipe.close()
                assert lifetimes == {CT_LIFETIME_TCP_S, CT_CLOSE_S}, lifetimes
            # each veth holds its own entry and its replies', keyed by endpoint and direction
            conns = {(i, d, src, dst) for i, d, src, dst, sport, dport, proto, _seen, _flags
                     in dp.ct_items() if proto == TCP and 8080 in (sport, dport)}
            assert {(idx[pod_a], EGRESS, a_ip, b_ip), (idx[pod_a], INGRESS, b_ip, a_ip),
                    (idx[pod_b], INGRESS, a_ip, b_ip), (idx[pod_b], EGRESS, b_ip, a_ip)} <= conns
        finally:
            for prefix in (f"{a_ip}/{host}", f"{b_ip}/{host}"):
                dp.ipcache_delete(prefix)
            for item in dp.policy_items():
                if item[0] in idx.values():
                    dp.policy_delete(*item[:5])
            for i in idx.values():
                for d in (INGRESS, EGRESS):
                    dp.enforce_delete(i, d)


TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
UDP = 17


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP packet as a TUN device carries it: no link header (UDP checksum 0: none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    words = sum(struct.unpack("!10H", header))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    return header[:10] + struct.pack("!H", ~words & 0xFFFF) + header[12:] + udp


def test_an_enrolled_hosts_policy_holds_on_its_l3_wireguard_device(dp: Datapath) -> None:
    """A TUN device (as wireguard-go's) carries the host's traffic decrypted, with no link
    header: the L3 programs, attached with the host's directions, judge it by identity."""
    host_ip, allowed_ip, denied_ip = "10.204.0.1", "10.204.1.5", "10.204.1.6"
    with netns("plx-tbt") as ns:
        name = unique("plxtun")
        with inside(ns):
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
            server_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        idx = -1
        try:
            sh("ip", "addr", "add", f"{host_ip}/32", "dev", name, ns=ns)
            sh("ip", "link", "set", name, "up", ns=ns)
            sh("ip", "route", "add", "10.204.1.0/24", "dev", name, ns=ns)
            server_sock.bind((host_ip, 9000))
            server_sock.settimeout(0.3)
            with inside(ns):
                idx = attach.attach(name, (dp.from_pod.fd, dp.from_pod.name),
                                    (dp.to_pod.fd, dp.to_pod.name), uplink=True,
                                    l3=((dp.from_pod_l3.fd, dp.from_pod_l3.name),
                                        (dp.to_pod_l3.fd, dp.to_pod_l3.name)))
            dp.ipcache_set(f"{allowed_ip}/32", ALLOWED, "", 0)
            dp.ipcache_set(f"{denied_ip}/32", DENIED, "", 0)

            def arrives(src: str, marker: bytes, sport: int = 4000) -> bool:
                os.write(tun, ipv4_udp(src, host_ip, sport, 9000, marker))
                try:
                    return server_sock.recv(64) == marker
                except TimeoutError:
                    return False

            def leaves(dst: str, marker: bytes) -> bool:
                try:
                    server_sock.sendto(marker, (dst, 4001))
                except OSError:  # dropped at tc egress: the send may say so
                    return False
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    try:
                        if marker in os.read(tun, 2048):
                            return True
                    except BlockingIOError:
                        time.sleep(0.01)
                return False

            assert arrives(denied_ip, b"open", sport=3999)  # nothing selects the host yet
            dp.policy_set(idx, ALLOWED, 9000, UDP, INGRESS, ALLOW)
            dp.enforce_set(idx, INGRESS)
            assert arrives(allowed_ip, b"in-allowed")
            assert not arrives(denied_ip, b"in-denied")
            # the host's egress is tc egress here: to the denied peer, dropped before encryption
            dp.enforce_set(idx, EGRESS)
            dp.policy_set(idx, ALLOWED, 0, ANY, EGRESS, ALLOW)
            assert leaves(allowed_ip, b"out-allowed")
            assert not leaves(denied_ip, b"out-denied")
            conns = {(i, d, src, sport) for i, d, src, _dst, sport, dport, proto, _seen, _flags
                     in dp.ct_items() if proto == UDP and dport == 9000}
            assert (idx, INGRESS, allowed_ip, 4000) in conns
            assert (idx, INGRESS, denied_ip, 4000) not in conns
        finally:
            server_sock.close()
            os.close(tun)  # the device goes with its last file
            for prefix in (f"{allowed_ip}/32", f"{denied_ip}/32"):
                dp.ipcache_delete(prefix)
            for item in dp.policy_items():
                if item[0] == idx:
                    dp.policy_delete(*item[:5])
            for d in (INGRESS, EGRESS):
                dp.enforce_delete(idx, d)


def test_a_pinned_map_of_another_layout_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """bcc would adopt a pinned map whatever its key and value; one left by a program whose
    layout has changed is replaced by an empty map of the new layout, and said so."""
    from bcc import BPF

    pin = Path(f"/sys/fs/bpf/plexus-test-{secrets.token_hex(3)}")
    pin.mkdir()
    try:
        old = BPF(text=f'BPF_TABLE_PINNED("lru_hash", u64, u64, conntrack, 1024, "{pin}/conntrack");\n'
                       "int f(void *ctx) { return 0; }")
        old["conntrack"][old["conntrack"].Key(5)] = old["conntrack"].Leaf(7)
        old.cleanup()
        first = Datapath(pin)
        table = first.bpf["conntrack"]
        assert ctypes.sizeof(table.Key) != 8 and not list(table.keys())
        assert any("pinned map conntrack" in r.getMessage() for r in caplog.records)
        table[table.Key(ifindex=3)] = table.Leaf(seen=1)
        caplog.clear()
        second = Datapath(pin)  # same layout: adopted, entries kept
        assert [k.ifindex for k in second.bpf["conntrack"].keys()] == [3]
        assert not any("pinned map" in r.getMessage() for r in caplog.records)
        for d in (first, second):
            d.bpf.cleanup()
    finally:
        shutil.rmtree(pin, ignore_errors=True)


def test_a_datapath_compiled_early_is_the_one_taken_and_only_once() -> None:
    """A joining host starts the compile before its agent starts; the bpf module takes that
    datapath (its maps pinned, its programs loaded) rather than compiling again."""
    from bpf.loader import compile_early, datapath

    pin = Path(f"/sys/fs/bpf/plexus-test-{secrets.token_hex(3)}")
    made: list[Datapath] = []
    try:
        compile_early(pin)
        compile_early(pin)  # asked twice: still one compile
        early = datapath(pin / "sub" / "..")  # the same directory, spelt otherwise
        made.append(early)
        assert early.from_pod_l3.fd > 0 and (pin / "conntrack").exists()
        later = datapath(pin)  # taken once: the next one is compiled anew, on the same pins
        made.append(later)
        assert later is not early and later.from_pod.fd > 0
    finally:
        for d in made:
            d.bpf.cleanup()
        shutil.rmtree(pin, ignore_errors=True)


async def test_the_module_reports_its_reconcilers_as_every_module_does(tmp_path: Path) -> None:
    """Loaded, the bpf module's reconcilers (policy and load-balancer) are the hive's: shown
    with their object counts while they run, and ended by the module's stop."""
    from bpf.config import BpfConfig
    from bpf.policy import Enforced
    from plexus.core.node import LocalNode
    from tests.bpf_fixture import bpf_module

    pin = Path(f"/sys/fs/bpf/plexus-test-{secrets.token_hex(3)}")
    module, _tables = bpf_module(tmp_path, LocalNode("east", 1, "n1", "172.31.1.11", "10.1.1.0/24"),
                                 BpfConfig(enabled=True, pin_dir=pin))
    hive = module.hive
    try:
        await module.start()
        assert module.dp is not None, hive.health
        names = {"bpf-attach", "bpf-ipcache", "bpf-policy", "bpf-enforce", "bpf-lb-backends",
                 "bpf-lb-frontends"}

        def running() -> bool:
            st = hive.reconciler_status("bpf")
            return set(st) == names and all(r["running"] for r in st.values()) \
                and hive.reconcilers("bpf")["bpf-enforce"].pruned_once.is_set()

        await eventually(running, 30, what=lambda: str(hive.reconciler_status("bpf")))
        # a row the kernel refuses (no such interface) is counted and shown as the last error
        module.enforced.upsert(Enforced("plx-none-0", 0))
        await eventually(lambda: hive.reconciler_status("bpf")["bpf-enforce"]["objects"]["error"] == 1, 10)
        assert "plx-none-0" in hive.reconciler_status("bpf")["bpf-enforce"]["last_error"]
        assert "bpf-enforce" in hive.degraded()["bpf"]
        await module.stop()
        await hive.stop_module("bpf")
        assert not any(r["running"] for r in hive.reconciler_status("bpf").values())
    finally:
        module._polling.clear()  # the flow thread ends within its poll timeout
        await eventually(lambda: not any(t.name == "bpf-flows" for t in threading.enumerate()), 5)
        if module.dp is not None:
            for name in ("flows", "flows6", "lb4_flows"):
                table = module.dp.bpf[name]
                for cpu in list(table._open_key_fds):
                    del table[cpu]
        shutil.rmtree(pin, ignore_errors=True)

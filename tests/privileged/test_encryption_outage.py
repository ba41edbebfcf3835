"""The encryption module when its wireguard-go is killed, on two "nodes" in fresh namespaces.

Each node is a namespace with an underlay address on a veth joining the two and a pod address
behind it; both run the encryption module through a hive with real tables, each on its own
wireguard-go. The test kills one node's wireguard-go with SIGKILL and holds its restart back
for a while (the binary is a wrapper that refuses to start while a flag file exists), so the
outage lasts long enough to look at. A raw socket on the underlay reads every frame: in strict
mode a marker sent by UDP from pod to pod never appears in it, before, during or after the
outage; in non-strict mode it does during the outage only (which also shows the capture sees
plaintext when there is some).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clustermesh.models import Node, NodeAddress
from clustermesh.tables import NODES, nodes_table
from encryption.config import EncryptionConfig
from encryption.module import Encryption
from encryption.ops import FALLBACK_METRIC, PID_FILE, RouteOps, UserspaceBackend
from encryption.tables import EncryptedRoute
from plexus.core.module import Hive
from plexus.core.netlink import Netlink
from plexus.core.node import LOCAL_NODE, NODE_ATTRIBUTES, LocalNode, NodeAttributes
from tests.support import eventually, netns, sh, unique

pytestmark = pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")

TABLE = EncryptionConfig.model_validate({}).table
UNDERLAY = ("192.168.77.1", "192.168.77.2")
PODS = ("10.201.1.1", "10.201.2.1")
POD_CIDRS = ("10.201.1.0/24", "10.201.2.0/24")
UDP_PORT = 5555
ETH_P_ALL = 0x0003
RTN_BLACKHOLE = 6


@dataclass
class NodeUnderTest:
    ns: str
    name: str
    enc: Encryption
    hive: Hive
    state_dir: Path


class Capture:
    """Every frame on one interface of a namespace, read by a raw socket from a thread."""

    def __init__(self, ns: str, ifname: str) -> None:
        with Netlink(ns).entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def holds(self, marker: bytes) -> bool:
        return any(marker in f for f in list(self.frames))

    def udp_to(self, port: int) -> int:
        """Frames carrying IPv4 UDP to `port` (the encrypted traffic)."""
        n = 0
        for f in list(self.frames):
            if len(f) >= 38 and f[12:14] == b"\x08\x00" and f[23] == 17:
                ihl = (f[14] & 0x0F) * 4
                if int.from_bytes(f[14 + ihl + 2:14 + ihl + 4], "big") == port:
                    n += 1
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def udp_socket(ns: str, bind: tuple[str, int]) -> socket.socket:
    with Netlink(ns).entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    s.setblocking(False)
    return s


def received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            return out


def table_routes(ns: str) -> list[str]:
    """The IPv4 routes of the encryption table as "[blackhole ]dst[ dev name] metric m proto p",
    read by netlink: numbers stay numbers, whatever names /etc/iproute2 gives them."""
    # pyroute2 runs an event loop of its own: not on the test's
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_table_routes, ns).result()


def _table_routes(ns: str) -> list[str]:
    out = []
    with Netlink(ns).route() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for r in ipr.get_routes(family=socket.AF_INET, table=TABLE):
            if r.get_attr("RTA_TABLE") != TABLE:
                continue
            dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            kind = "blackhole " if r["type"] == RTN_BLACKHOLE else ""
            oif = r.get_attr("RTA_OIF")
            dev = f" dev {names.get(oif, oif)}" if oif else ""
            out.append(f"{kind}{dst}{dev} metric {r.get_attr('RTA_PRIORITY') or 0} proto {r['proto']}")
    return sorted(out, key=lambda line: int(line.split(" metric ")[1].split()[0]))


@contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    with netns("plx-wa") as a, netns("plx-wb") as b:
        sh("ip", "link", "add", "plxu", "type", "veth", "peer", "name", "plxu", "netns", b, ns=a)
        for ns, ip, pod, other_cidr, gw in ((a, UNDERLAY[0], PODS[0], POD_CIDRS[1], UNDERLAY[1]),
                                            (b, UNDERLAY[1], PODS[1], POD_CIDRS[0], UNDERLAY[0])):
            sh("ip", "addr", "add", f"{ip}/24", "dev", "plxu", ns=ns)
            sh("ip", "link", "set", "plxu", "up", ns=ns)
            # the pod's address on a link of its own (a veth pair: no dummy module here)
            sh("ip", "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p", ns=ns)
            sh("ip", "addr", "add", f"{pod}/32", "dev", "pod0", ns=ns)
            sh("ip", "link", "set", "pod0", "up", ns=ns)
            sh("ip", "link", "set", "pod0p", "up", ns=ns)
            # the clear path clustermesh's direct routes would give: what must not be used
            sh("ip", "route", "add", other_cidr, "via", gw, "src", pod, ns=ns)
        yield a, b


def wrapper(tmp: Path) -> tuple[Path, Path]:
    """A wireguard-go that refuses to start while the flag file exists."""
    real = shutil.which("wireguard-go")
    if real is None:
        pytest.fail("wireguard-go is not installed: run scripts/setup.sh")
    flag = tmp / "hold-restart"
    script = tmp / "wireguard-go-wrapper"
    script.write_text(f'#!/bin/sh\n[ -e "{flag}" ] && exit 1\nexec "{real}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, flag


async def start_node(ns: str, name: str, cidr: str, ip: str, strict: bool, binary: Path,
                     state_dir: Path) -> NodeUnderTest:
    hive = Hive(agent=SimpleNamespace(node=SimpleNamespace(mtu=1500)), state_dir=state_dir)
    hive.provide(LOCAL_NODE, LocalNode("c1", 1, name, ip, cidr))
    hive.provide(NODES, nodes_table())
    hive.provide(NODE_ATTRIBUTES, NodeAttributes())
    config = EncryptionConfig.model_validate({
        "enabled": True, "strict": strict, "backend": "userspace", "device": unique("plxw"),
        "wireguard_go": str(binary)})
    enc = Encryption(hive, config, Netlink(ns))
    await enc.start()
    return NodeUnderTest(ns, name, enc, hive, state_dir)


def record(node: NodeUnderTest, ip: str, cidr: str) -> Node:
    assert node.enc.keys is not None
    return Node(name=node.name, cluster="c1", cluster_id=1,
                addresses=(NodeAddress("InternalIP", ip),), ipv4_alloc_cidr=cidr,
                wireguard_pubkey=node.enc.keys.public_b64)


@pytest.fixture
async def nodes(root: None, tmp_path: Path, request: pytest.FixtureRequest
                ) -> AsyncIterator[tuple[NodeUnderTest, NodeUnderTest, Path]]:
    strict: bool = request.param
    binary, flag = wrapper(tmp_path)
    started: list[NodeUnderTest] = []
    with two_namespaces() as (ns_a, ns_b):
        try:
            a = await start_node(ns_a, "a", POD_CIDRS[0], UNDERLAY[0], strict, binary, tmp_path / "a")
            started.append(a)
            b = await start_node(ns_b, "b", POD_CIDRS[1], UNDERLAY[1], strict, binary, tmp_path / "b")
            started.append(b)
            a.hive.require(NODES).upsert(record(b, UNDERLAY[1], POD_CIDRS[1]))
            b.hive.require(NODES).upsert(record(a, UNDERLAY[0], POD_CIDRS[0]))
            yield a, b, flag
        finally:
            for n in started:
                await n.hive.stop_module("encryption")
                backend = n.enc.backend
                if isinstance(backend, UserspaceBackend):
                    backend.remove()  # the wireguard-go this test started, by its pid
            for state_dir in (tmp_path / "a", tmp_path / "b"):
                if not any(n.state_dir == state_dir for n in started):
                    stop_recorded_wireguard_go(state_dir)  # a node that failed to start


def stop_recorded_wireguard_go(state_dir: Path) -> None:
    """Stop the wireguard-go a failed start recorded in `state_dir`, by its pid."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip() or 0)
        running = b"wireguard-go" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if pid and running:
        os.kill(pid, signal.SIGKILL)


def metric(node: NodeUnderTest, name: str) -> float | None:
    value = node.hive.metrics.registry.get_sample_value(name)
    return None if value is None else float(value)


async def send_until_received(src: socket.socket, dst: socket.socket, marker: bytes) -> None:
    async def through() -> bool:
        src.sendto(marker, (PODS[1], UDP_PORT))
        await asyncio.sleep(0.05)
        return marker in received(dst)
    await eventually(through, timeout=15, what=f"{marker!r} received by the other pod")


@pytest.mark.parametrize("nodes", [True, False], ids=["strict", "non-strict"], indirect=True)
async def test_wireguard_go_killed_is_restarted_and_strict_mode_never_leaks(
        nodes: tuple[NodeUnderTest, NodeUnderTest, Path]) -> None:
    a, b, hold_restart = nodes
    strict = a.enc.config.strict
    device = a.enc.config.device
    capture = Capture(a.ns, "plxu")
    pod_a = udp_socket(a.ns, (PODS[0], 0))
    pod_b = udp_socket(b.ns, (PODS[1], UDP_PORT))
    try:
        # encrypted from the start: through the device, a fallback under it in strict mode
        await eventually(lambda: any(f"dev {device}" in r for r in table_routes(a.ns)),
                         what=lambda: f"device route in table {TABLE}: {table_routes(a.ns)}")
        await send_until_received(pod_a, pod_b, b"MARKER-BEFORE")
        assert capture.udp_to(a.enc.config.port) > 0, "no encrypted traffic seen: capture broken?"
        fallback = f"blackhole {POD_CIDRS[1]} metric {FALLBACK_METRIC} proto 190"
        assert (fallback in table_routes(a.ns)) == strict, table_routes(a.ns)

        # kill -9, and hold the restart back so the outage can be looked at
        hold_restart.touch()
        pid = int((a.state_dir / PID_FILE).read_text())
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: not a.enc.device_health.as_dict()["up"],
                         timeout=5, what="the outage noticed")
        await eventually(lambda: a.enc.device_health.last_error, timeout=5,
                         what="a failed restart reported")
        status: dict[str, Any] = a.enc.status()["device"]
        assert status["downSince"] and status["outages"] == 1 and status["restarts"] == 0
        assert "down since" in a.hive.health["encryption"]
        shown = a.enc.describe()  # what `plexus encrypt status` shows, with the device gone
        assert shown["deviceHealth"]["up"] is False and shown["peers"] == []
        assert metric(a, "plexus_wireguard_device_up") == 0.0
        await eventually(lambda: not any(f"dev {device}" in r for r in table_routes(a.ns)),
                         what="the device route gone with its device")
        assert table_routes(a.ns) == ([fallback] if strict else []), table_routes(a.ns)

        refused = 0
        for _ in range(50):
            try:
                pod_a.sendto(b"MARKER-DURING", (PODS[1], UDP_PORT))
            except OSError as e:  # a blackhole route refuses a local sender with EINVAL
                assert e.errno == errno.EINVAL
                refused += 1
        if strict:
            assert refused == 50
            assert not capture.holds(b"MARKER-DURING")
        else:
            await eventually(lambda: capture.holds(b"MARKER-DURING"), timeout=5,
                             what="clear traffic during the outage (non-strict) on the capture")

        # let it start: device, peer and routes come back, traffic is encrypted again
        hold_restart.unlink()
        await eventually(lambda: a.enc.device_health.as_dict()["up"], timeout=10,
                         what="the device restarted")
        await eventually(lambda: any(f"dev {device}" in r for r in table_routes(a.ns)),
                         what=lambda: f"device route restored: {table_routes(a.ns)}")
        assert a.enc.backend is not None
        backend = a.enc.backend
        # the restarted device gets its peers from the reconciler, just after its route
        await eventually(lambda: set(backend.info().peers) == {p.public_key for p in a.enc.peers},
                         what=lambda: f"peers on the restarted device: {backend.info().peers}")
        await send_until_received(pod_a, pod_b, b"MARKER-AFTER")
        health = a.enc.status()["device"]
        assert health["restarts"] == 1 and health["lastOutage"]["until"] is not None
        assert health["lastOutage"]["seconds"] > 0
        assert a.hive.health["encryption"] == "ok"
        assert metric(a, "plexus_wireguard_device_restarts_total") == 1.0
        assert metric(a, "plexus_wireguard_device_up") == 1.0
        assert a.enc.describe()["deviceHealth"]["restarts"] == 1

        assert not capture.holds(b"MARKER-BEFORE")
        assert not capture.holds(b"MARKER-AFTER")
        if strict:
            assert not capture.holds(b"MARKER-DURING")
            assert fallback in table_routes(a.ns)
    finally:
        capture.close()
        pod_a.close()
        pod_b.close()


@pytest.mark.parametrize("nodes", [True], ids=["strict"], indirect=True)
async def test_strict_fallbacks_outlive_the_agent_and_the_rule_comes_back(
        nodes: tuple[NodeUnderTest, NodeUnderTest, Path]) -> None:
    a, _b, _flag = nodes
    device = a.enc.config.device
    fallback = f"blackhole {POD_CIDRS[1]} metric {FALLBACK_METRIC} proto 190"
    await eventually(lambda: any(f"dev {device}" in r for r in table_routes(a.ns)),
                     what=lambda: f"device route in table {TABLE}: {table_routes(a.ns)}")
    assert fallback in table_routes(a.ns)

    # the rule deleted behind the agent's back comes back
    sh("ip", "rule", "del", "table", str(TABLE), ns=a.ns)
    await eventually(lambda: f"lookup {TABLE}" in sh("ip", "rule", "show", ns=a.ns).stdout,
                     timeout=5, what="the ip rule added again")

    # the agent stops (stop is not remove), then wireguard-go dies: the fallback drops
    await a.enc.stop()
    await a.hive.stop_module("encryption")
    pid = int((a.state_dir / PID_FILE).read_text())
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: table_routes(a.ns) == [fallback],
                     what=lambda: f"only the fallback left: {table_routes(a.ns)}")

    # a new agent finds it dead, starts it, counts it
    old = a.enc.backend
    assert old is not None
    await eventually(lambda: old.pid() is None, what="the killed wireguard-go reaped")
    hive = Hive(agent=SimpleNamespace(node=SimpleNamespace(mtu=1500)), state_dir=a.state_dir)
    hive.provide(LOCAL_NODE, LocalNode("c1", 1, "a", UNDERLAY[0], POD_CIDRS[0]))
    hive.provide(NODES, nodes_table()).upsert(a.hive.require(NODES).get(("c1", "b")))  # type: ignore[arg-type]
    hive.provide(NODE_ATTRIBUTES, NodeAttributes())
    again = Encryption(hive, a.enc.config, a.enc.netlink)
    await again.start()
    a.hive, a.enc = hive, again  # the fixture stops this one
    assert again.status()["device"]["restarts"] == 1
    await eventually(lambda: any(f"dev {device}" in r for r in table_routes(a.ns)),
                     what=lambda: f"device route restored: {table_routes(a.ns)}")
    assert fallback in table_routes(a.ns)


async def test_strict_route_ops_keep_a_fallback_the_device_cannot_take_along(root: None) -> None:
    with netns("plx-wr") as ns:
        sh("ip", "link", "add", "plxwg", "type", "veth", "peer", "name", "plxwgp", ns=ns)
        sh("ip", "link", "set", "plxwgp", "up", ns=ns)
        sh("ip", "link", "set", "plxwg", "up", ns=ns)
        strict = RouteOps("plxwg", TABLE, 100, Netlink(ns), strict=True)
        v4 = EncryptedRoute("10.2.1.0/24", "device", ("c1", "n2"))
        fallback = f"blackhole 10.2.1.0/24 metric {FALLBACK_METRIC} proto 190"
        await strict.update(v4)
        assert table_routes(ns) == ["10.2.1.0/24 dev plxwg metric 0 proto 190", fallback]
        await strict.update(v4)
        assert len(table_routes(ns)) == 2

        sh("ip", "link", "del", "plxwg", ns=ns)  # the device dies: its route with it
        assert table_routes(ns) == [fallback]
        await strict.delete(v4)
        assert table_routes(ns) == []

        await strict.update(EncryptedRoute("10.2.1.0/24", "blackhole", ("c1", "n2")))
        await strict.prune([v4])
        assert table_routes(ns) == ["blackhole 10.2.1.0/24 metric 0 proto 190", fallback]
        # the same node table without strict mode: the fallback goes at the first prune
        await RouteOps("plxwg", TABLE, 100, Netlink(ns)).prune([v4])
        assert table_routes(ns) == ["blackhole 10.2.1.0/24 metric 0 proto 190"]

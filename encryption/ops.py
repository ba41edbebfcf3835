"""The WireGuard device (kernel or wireguard-go), its peers and its routes.

Everything here acts on one network namespace: the agent's own unless a `Netlink` names another.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from errno import EAFNOSUPPORT
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from encryption.keys import KeyPair
from encryption.tables import EncryptedRoute, Peer
from encryption.uapi import DeviceInfo, PeerInfo, Uapi, UapiError
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.reconciler import TemporaryError

log = logging.getLogger(__name__)
IFF_UP = 0x1
RTPROT_PLEXUS = 190
RT_TABLE_MAIN = 254
FAMILIES = (AF_INET, AF_INET6)
WG_LOG = "wireguard-go.log"
PID_FILE = "wireguard-go.pid"
# Strict mode keeps a blackhole under every remote pod CIDR at this metric, worse than the
# device route's (0): a device route dies with its device, a blackhole has none and stays,
# so a lookup finds "drop" whenever the device is gone, never the main table's clear path.
FALLBACK_METRIC = 4096
ESRCH = 3
IPPROTO_UDP = 17


class BackendUnavailable(Exception):
    pass


class Backend(Protocol):
    name: str

    def ensure(self, keys: KeyPair, port: int, mtu: int) -> None: ...
    def alive(self) -> bool: ...
    def pid(self) -> int | None: ...
    def restart(self, keys: KeyPair, port: int, mtu: int) -> None: ...
    def info(self) -> DeviceInfo: ...
    def set_peer(self, peer: Peer) -> None: ...
    def set_peers(self, peers: list[Peer]) -> None: ...
    def remove_peer(self, public_key: bytes) -> None: ...
    def remove(self) -> None: ...


def _link_up(device: str, mtu: int, netlink: Netlink = AGENT_NETNS) -> int:
    with netlink.route() as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            raise BackendUnavailable(f"device {device} did not appear")
        ipr.link("set", index=found[0], mtu=mtu, state="up")
        return int(found[0])


def _link_is_up(device: str, netlink: Netlink) -> bool:
    """The device exists and is administratively up (a device set down loses its routes)."""
    with netlink.route() as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            return False
        links = ipr.get_links(found[0])
        return bool(links) and bool(links[0]["flags"] & IFF_UP)


class UserspaceBackend:
    """wireguard-go on a TUN device, configured through its UAPI socket.

    wireguard-go runs in its own session so it outlives the agent (stop is not remove);
    a restarted agent finds the socket and adopts the device. Its pid is kept in the state
    dir, so the agent that adopts it can watch it too.
    """

    name = "userspace (wireguard-go)"

    def __init__(self, device: str, state_dir: Path, binary: str = "wireguard-go",
                 netlink: Netlink = AGENT_NETNS, fwmark: int = 0) -> None:
        self.device = device
        self.fwmark = fwmark  # on its UDP sockets: what it sends bypasses its own routes
        self.state_dir = state_dir
        self.binary = binary
        self.netlink = netlink
        self.uapi = Uapi(device)
        self.found_dead = False  # a pid file named a wireguard-go that was gone at start

    def pid(self) -> int | None:
        """The running wireguard-go's pid; None when it is gone."""
        pid_file = self.state_dir / PID_FILE
        try:
            pid = int(pid_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and b"wireguard-go" in _cmdline(pid) else None

    def alive(self) -> bool:
        return self.pid() is not None and _link_is_up(self.device, self.netlink)

    def restart(self, keys: KeyPair, port: int, mtu: int) -> None:
        """Stop what is left of the device's wireguard-go, start a new one, configure it."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)  # a wireguard-go without its device serves nothing
            deadline = time.monotonic() + 5
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
        self._start()
        self.ensure(keys, port, mtu)

    def _alive(self) -> bool:
        if not self.uapi.exists():
            return False
        try:
            self.uapi.get()
            return True
        except UapiError:
            return False

    def _last_words(self) -> str:
        """The end of wireguard-go's log, for the status that says why it is not running."""
        try:
            lines = (self.state_dir / WG_LOG).read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " | ".join(lines[-3:]) or f"nothing in {self.state_dir / WG_LOG}"

    def _start(self) -> None:
        if (self.state_dir / PID_FILE).exists() and self.pid() is None:
            self.found_dead = True
        self.uapi.path.unlink(missing_ok=True)
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # wireguard-go outlives the agent: started by a shell that exits at once, so it is no
        # child of ours to reap (init does) and its pid is what the shell printed.
        launch = 'exec </dev/null 2>>"$2"; "$3" -f "$1" >>"$2" 2>&1 & echo $!'
        shell = subprocess.run(
            self.netlink.argv(["sh", "-c", launch, "sh", self.device,
                               str(self.state_dir / WG_LOG), self.binary]),
            env=env, start_new_session=True, timeout=10, stdin=subprocess.DEVNULL,
            capture_output=True, check=False)
        printed = shell.stdout.strip()
        if shell.returncode != 0 or not printed.isdigit():
            raise BackendUnavailable(
                f"wireguard-go did not start: {shell.stderr.decode(errors='replace').strip()}")
        pid = int(printed)
        (self.state_dir / PID_FILE).write_text(f"{pid}\n")
        deadline = time.monotonic() + 10
        while not self._alive():
            # by the pid itself: its cmdline reads empty while it execs wireguard-go
            if _exited(pid):
                raise BackendUnavailable(f"wireguard-go exited: {self._last_words()}")
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # no stray wireguard-go holding the device name
                raise BackendUnavailable("wireguard-go did not open its UAPI socket")
            time.sleep(0.02)
        log.info("started wireguard-go device=%s pid=%d", self.device, pid)

    def ensure(self, keys: KeyPair, port: int, mtu: int) -> None:
        if not self._alive():
            self._start()
        info = self.uapi.get()
        if (info.private_key, info.listen_port, info.fwmark) != (keys.private_bytes, port,
                                                                 self.fwmark):
            self.uapi.set_device(keys.private_bytes, port, self.fwmark)
        _link_up(self.device, mtu, self.netlink)

    def info(self) -> DeviceInfo:
        return self.uapi.get()

    def set_peer(self, peer: Peer) -> None:
        self.set_peers([peer])

    def set_peers(self, peers: list[Peer]) -> None:
        self.uapi.set_peers([(p.public_key, (p.endpoint, p.port), list(p.allowed_ips), 0)
                             for p in peers])

    def remove_peer(self, public_key: bytes) -> None:
        self.uapi.remove_peer(public_key)

    def remove(self) -> None:
        pid_file = self.state_dir / PID_FILE
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and b"wireguard-go" in _cmdline(pid):
                os.kill(pid, signal.SIGTERM)
            pid_file.unlink()
        self.uapi.path.unlink(missing_ok=True)


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class KernelBackend:
    """The kernel module, through netlink (pyroute2's WireGuard family)."""

    name = "kernel"

    def __init__(self, device: str, netlink: Netlink = AGENT_NETNS, fwmark: int = 0) -> None:
        self.device = device
        self.netlink = netlink
        self.fwmark = fwmark

    def ensure(self, keys: KeyPair, port: int, mtu: int) -> None:
        with self.netlink.route() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if found:
                info = ipr.get_links(found[0])[0].get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "wireguard":
                    raise BackendUnavailable(f"{self.device} exists and is a {kind or 'plain'} device")
            else:
                try:
                    ipr.link("add", ifname=self.device, kind="wireguard")
                except NetlinkError as e:
                    raise BackendUnavailable(f"no WireGuard kernel module ({e})") from None
        try:
            with self.netlink.wireguard() as wg:
                wg.set(self.device, private_key=base64.b64encode(keys.private_bytes).decode(),
                       listen_port=port, fwmark=self.fwmark)
        except NetlinkError as e:
            # No WireGuard netlink family: the device found is wireguard-go's TUN, kept from
            # before a restart; the userspace backend adopts it.
            raise BackendUnavailable(f"no WireGuard netlink family ({e})") from None
        _link_up(self.device, mtu, self.netlink)

    def alive(self) -> bool:
        return _link_is_up(self.device, self.netlink)

    def pid(self) -> int | None:
        return None  # the kernel's device has no process to watch

    def restart(self, keys: KeyPair, port: int, mtu: int) -> None:
        self.ensure(keys, port, mtu)

    def info(self) -> DeviceInfo:
        out = DeviceInfo()
        with self.netlink.wireguard() as wg:
            for msg in wg.info(self.device):
                out.listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or 0
                for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                    pub = base64.b64decode(p.get_attr("WGPEER_A_PUBLIC_KEY"))
                    out.peers[pub] = PeerInfo(pub, rx_bytes=p.get_attr("WGPEER_A_RX_BYTES") or 0,
                                              tx_bytes=p.get_attr("WGPEER_A_TX_BYTES") or 0)
        return out

    def set_peers(self, peers: list[Peer]) -> None:
        for p in peers:
            self.set_peer(p)

    def set_peer(self, peer: Peer) -> None:
        with self.netlink.wireguard() as wg:
            wg.set(self.device, peer={
                "public_key": base64.b64encode(peer.public_key).decode(),
                "endpoint_addr": peer.endpoint, "endpoint_port": peer.port,
                "allowed_ips": list(peer.allowed_ips)})

    def remove_peer(self, public_key: bytes) -> None:
        with self.netlink.wireguard() as wg:
            wg.set(self.device, peer={"public_key": base64.b64encode(public_key).decode(),
                                      "remove": True})

    def remove(self) -> None:
        with self.netlink.route() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if found:
                ipr.link("del", index=found[0])


def detect(choice: str, device: str, state_dir: Path, binary: str, keys: KeyPair, port: int,
           mtu: int, netlink: Netlink = AGENT_NETNS, fwmark: int = 0) -> Backend:
    """The backend to use: the kernel module when asked or available, else wireguard-go.

    A device wireguard-go already serves (an agent restart) is adopted, never probed.
    `fwmark` marks the device's own UDP packets (0: none).
    """
    if choice == "auto" and UserspaceBackend(device, state_dir, binary, netlink)._alive():
        backend = UserspaceBackend(device, state_dir, binary, netlink, fwmark)
        backend.ensure(keys, port, mtu)
        return backend
    if choice in ("auto", "kernel"):
        kernel = KernelBackend(device, netlink, fwmark)
        try:
            kernel.ensure(keys, port, mtu)
            return kernel
        except BackendUnavailable as e:
            if choice == "kernel":
                raise
            log.info("WireGuard kernel module unavailable (%s): using wireguard-go", e)
    backend = UserspaceBackend(device, state_dir, binary, netlink, fwmark)
    backend.ensure(keys, port, mtu)
    return backend


class PeerOps:
    """Peers on the device. Updates that arrive together go out as one request, so 1,000
    peers cost a handful of UAPI round trips instead of 1,000."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._pending: list[tuple[Peer, asyncio.Future[None]]] = []
        self._flushing = False
        self._flushes: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    async def update(self, peer: Peer) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((peer, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        await fut

    def _start_flush(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = False
        try:
            await asyncio.to_thread(self.backend.set_peers, [p for p, _ in batch])
        except (UapiError, NetlinkError, OSError) as e:
            failure: Exception = TemporaryError(str(e))
        except Exception as e:  # every waiting update hears of it, none waits forever
            failure = e
        else:
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(failure)

    async def delete(self, peer: Peer) -> None:
        try:
            await asyncio.to_thread(self.backend.remove_peer, peer.public_key)
        except (UapiError, NetlinkError, OSError) as e:
            raise TemporaryError(str(e)) from None

    async def prune(self, peers: Iterable[Peer]) -> None:
        keep = {p.public_key for p in peers}
        info = await asyncio.to_thread(self.backend.info)
        for pub in info.peers:
            if pub not in keep:
                await asyncio.to_thread(self.backend.remove_peer, pub)


class RouteOps:
    """Routes in the encryption table; an ip rule per family sends lookups there before
    `main`. Pod CIDRs are IPv4 and IPv6 alike, so every dump asks for both families
    (netlink dumps one family per request).

    In strict mode every remote pod CIDR also gets a blackhole at `FALLBACK_METRIC`, put in
    before its device route and left in place by stop: whatever happens to the device, the
    CIDR's traffic is encrypted or dropped.

    With `udp_ports` the rules send only UDP packets to those destination ports to the table
    (one rule per port; a rule of a port no longer listed goes): tunnels between nodes."""

    def __init__(self, device: str, table: int, priority: int,
                 netlink: Netlink = AGENT_NETNS, *, strict: bool = False, fwmark: int = 0,
                 udp_ports: Callable[[], Iterable[int]] | None = None) -> None:
        self.device = device
        self.table = table
        self.priority = priority
        self.netlink = netlink
        self.strict = strict
        # The device's own packets carry `fwmark`; a rule just before the table's sends them
        # to `main`, so an enrolled host's address (its endpoint too) may route through
        # the device without the device's packets to it looping back in.
        self.fwmark = fwmark
        self.udp_ports = udp_ports

    def _rules(self) -> list[dict[str, Any]]:
        if self.udp_ports is not None:
            return [{"table": self.table, "priority": self.priority, "FRA_IP_PROTO": IPPROTO_UDP,
                     "FRA_DPORT_RANGE": f"{port}:{port}"} for port in sorted(set(self.udp_ports()))]
        rules: list[dict[str, Any]] = [{"table": self.table, "priority": self.priority}]
        if self.fwmark:
            rules.append({"table": RT_TABLE_MAIN, "priority": self.priority - 1,
                          "fwmark": self.fwmark, "fwmask": self.fwmark})
        return rules

    def ensure_rule(self) -> bool:
        """Add the rules where they are missing; True when one had to be added."""
        added = False
        wanted = self._rules()
        with self.netlink.route() as ipr:
            for family in FAMILIES:
                present = {_rule_key(r) for r in ipr.get_rules(family=family)}
                if self.udp_ports is not None:  # a port no longer listed: its rule goes
                    keep = {(r["table"], r["priority"], 0, r["FRA_DPORT_RANGE"]) for r in wanted}
                    for key in present:
                        if key[:2] == (self.table, self.priority) and key not in keep:
                            ipr.rule("del", family=family, table=self.table,
                                     priority=self.priority, FRA_IP_PROTO=IPPROTO_UDP,
                                     FRA_DPORT_RANGE=key[3])
                for rule in wanted:
                    if (rule["table"], rule["priority"], rule.get("fwmark", 0),
                            rule.get("FRA_DPORT_RANGE")) in present:
                        continue
                    try:
                        ipr.rule("add", family=family, **rule)
                        added = True
                    except NetlinkError as e:
                        if family != AF_INET6 or e.code != EAFNOSUPPORT:
                            raise
                        log.info("no IPv6 in this namespace: encryption rules for IPv4 only")
                        break
        return added

    def _update(self, r: EncryptedRoute) -> None:
        with self.netlink.route() as ipr:
            if self.strict:
                ipr.route("replace", dst=r.dst, family=_family(r.dst), table=self.table,
                          type="blackhole", proto=RTPROT_PLEXUS, priority=FALLBACK_METRIC)
            if r.kind == "blackhole":
                ipr.route("replace", dst=r.dst, family=_family(r.dst), table=self.table,
                          type="blackhole", proto=RTPROT_PLEXUS)
                return
            found = ipr.link_lookup(ifname=self.device)
            if not found:
                raise TemporaryError(f"device {self.device} is missing")
            ipr.route("replace", dst=r.dst, family=_family(r.dst), table=self.table,
                      oif=found[0], proto=RTPROT_PLEXUS, **({"prefsrc": r.src} if r.src else {}))

    def _delete(self, r: EncryptedRoute) -> None:
        with self.netlink.route() as ipr:
            for _ in range(8):  # the device route and the fallback: one per request
                try:
                    ipr.route("del", dst=r.dst, family=_family(r.dst), table=self.table)
                except NetlinkError as e:
                    if e.code != ESRCH:  # gone already
                        raise
                    return

    def _prune(self, rows: list[EncryptedRoute]) -> None:
        keep = {ipaddress.ip_network(r.dst, strict=False) for r in rows}
        with self.netlink.route() as ipr:
            for family in FAMILIES:
                for route in list(ipr.get_routes(family=family, table=self.table)):
                    dst = route.get_attr("RTA_DST")
                    if dst is None or route.get_attr("RTA_TABLE") != self.table:
                        continue
                    net = ipaddress.ip_network(f"{dst}/{route['dst_len']}")
                    metric = route.get_attr("RTA_PRIORITY") or 0
                    # a fallback outlives strict mode only until the first prune
                    stale_fallback = not self.strict and metric == FALLBACK_METRIC
                    if net not in keep or stale_fallback:
                        # its own scope: the kernel matches it, and a route someone added
                        # by hand is often scope link
                        try:
                            ipr.route("del", dst=str(net), family=family, table=self.table,
                                      scope=route["scope"], priority=metric)
                        except NetlinkError as e:
                            if e.code != ESRCH:
                                raise

    async def update(self, r: EncryptedRoute) -> None:
        await asyncio.to_thread(self._update, r)

    async def delete(self, r: EncryptedRoute) -> None:
        await asyncio.to_thread(self._delete, r)

    async def prune(self, rows: Iterable[EncryptedRoute]) -> None:
        await asyncio.to_thread(self._prune, list(rows))


def _rule_key(r: Any) -> tuple[Any, Any, int, str | None]:
    """(table, priority, fwmark, destination port range) of a rule read back."""
    return (r.get_attr("FRA_TABLE"), r.get_attr("FRA_PRIORITY"), r.get_attr("FRA_FWMARK") or 0,
            r.get_attr("FRA_DPORT_RANGE"))


def _family(cidr: str) -> int:
    return AF_INET6 if ":" in cidr else AF_INET

"""The ExaBGP driver: config rendering, the API command builder, the supervised process
and the Ops that sends each peer's route difference.

ExaBGP reads commands from its helper process (bgp/bridge.py), which relays a unix
socket the agent listens on. The agent reads everything ExaBGP writes, all the time, so
ExaBGP never blocks on a full pipe; acknowledgements ("done"/"error") are matched to
commands in order, which lets many commands be in flight at once. Route changes go as
`plexus-bulk` commands (packed prefixes, added to ExaBGP by bgp/launcher.py) when the
running ExaBGP answers the probe sent first on every API connection, else as ExaBGP's own
`announce/withdraw attributes ... nlri` text.

Stop is not remove: on agent stop ExaBGP is killed without a NOTIFICATION, so a router
with graceful restart keeps the routes (stale) for the restart time, or until hold time
without it; the next agent re-announces before End-of-RIB (routes are in the config).
`drain` withdraws deliberately.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bgp.launcher import BULK
from bgp.tables import IPAddress, IPNetwork, Neighbor, PeerRoutes, RouteAttrs
from plexus.core.reconciler import PermanentError, TemporaryError

log = logging.getLogger(__name__)
BRIDGE = Path(__file__).with_name("bridge.py")
PROCESS = "plexus"


class CommandError(ValueError):
    """A value that must not be spliced into an ExaBGP command or config."""


def safe(text: str) -> str:
    """Refuse control characters (a newline would start a new command)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CommandError(f"control character in {text!r}")
    return text


# ---- command builder --------------------------------------------------------------------

def attrs_text(a: RouteAttrs) -> str:
    parts = ["next-hop self"]
    if a.local_pref is not None:
        parts.append(f"local-preference {int(a.local_pref)}")
    if a.communities:
        parts.append("community [" + " ".join(f"{int(x)}:{int(y)}" for x, y in a.communities) + "]")
    if a.large_communities:
        parts.append("large-community ["
                     + " ".join(f"{int(x)}:{int(y)}:{int(z)}" for x, y, z in a.large_communities) + "]")
    return " ".join(parts)


def _net(n: IPNetwork) -> str:
    if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise CommandError(f"not a prefix: {n!r}")
    return str(n)


def _addr(a: IPAddress) -> str:
    if not isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise CommandError(f"not an address: {a!r}")
    return str(a)


def grouped(routes: Iterable[tuple[IPNetwork, RouteAttrs]], batch: int
            ) -> list[tuple[RouteAttrs, list[IPNetwork]]]:
    """Prefixes grouped by identical attributes and address family, in chunks of `batch`."""
    groups: dict[tuple[int, RouteAttrs], list[IPNetwork]] = {}
    for net, attrs in routes:
        _net(net)
        if not isinstance(attrs, RouteAttrs):
            raise CommandError(f"not route attributes: {attrs!r}")
        groups.setdefault((net.version, attrs), []).append(net)
    out = []
    def order(kv: tuple[tuple[int, RouteAttrs], list[IPNetwork]]) -> tuple[object, ...]:
        (v, a), _ = kv
        return (v, -1 if a.local_pref is None else a.local_pref, a.communities, a.large_communities)

    for (_, attrs), nets in sorted(groups.items(), key=order):
        nets.sort()
        for i in range(0, len(nets), batch):
            out.append((attrs, nets[i:i + batch]))
    return out


def announce_commands(peer: IPAddress, routes: Iterable[tuple[IPNetwork, RouteAttrs]],
                      batch: int) -> list[str]:
    _addr(peer)
    return [safe(f"neighbor {_addr(peer)} announce attributes {attrs_text(a)} nlri "
                 + " ".join(_net(n) for n in nets))
            for a, nets in grouped(routes, batch)]


def withdraw_commands(peer: IPAddress, nets: Iterable[IPNetwork], batch: int) -> list[str]:
    _addr(peer)
    return [safe(f"neighbor {_addr(peer)} withdraw attributes next-hop self nlri "
                 + " ".join(_net(n) for n in ns))
            for _, ns in grouped(((n, RouteAttrs()) for n in nets), batch)]


def pack_prefixes(nets: Iterable[IPNetwork]) -> str:
    """Prefixes in BGP NLRI wire form (mask length, significant address bytes), base64."""
    out = bytearray()
    for n in nets:
        size = (n.prefixlen + 7) // 8
        out.append(n.prefixlen)
        out += n.network_address.packed[:size]
    return base64.b64encode(bytes(out)).decode()


def bulk_commands(peer: IPAddress, gone: Iterable[IPNetwork], new: Iterable[tuple[IPNetwork, RouteAttrs]],
                  batch: int) -> list[str]:
    """The same changes as withdraw_commands + announce_commands, in the compact
    `plexus-bulk` form that bgp/launcher.py adds to ExaBGP (withdrawals first)."""
    head = f"neighbor {_addr(peer)} {BULK}"
    fam = {4: "ipv4", 6: "ipv6"}
    out = [f"{head} withdraw {fam[ns[0].version]} {pack_prefixes(ns)}"
           for _, ns in grouped(((n, RouteAttrs()) for n in gone), batch)]
    out += [safe(f"{head} announce {fam[ns[0].version]} {pack_prefixes(ns)} {attrs_text(a)}")
            for a, ns in grouped(new, batch)]
    return out


# ---- config rendering -------------------------------------------------------------------

def render_config(neighbors: Iterable[Neighbor], routes: Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]],
                  socket_path: Path, batch: int) -> str:
    """ExaBGP's config; each neighbor carries its routes so they go out before End-of-RIB."""
    run = f"{sys.executable} {BRIDGE} {socket_path}"
    if any(c.isspace() or c in ";{}\"'" for c in f"{sys.executable}{BRIDGE}{socket_path}"):
        raise CommandError(f"paths must not contain spaces or ';{{}}\"': {run}")
    out = [f"process {PROCESS} {{", f"    run {safe(run)};", "    encoder json;", "}", ""]
    for n in sorted(neighbors, key=lambda n: (n.peer_address.version, n.peer_address)):
        out += [
            f"neighbor {_addr(n.peer_address)} {{",
            f"    description \"{safe(n.instance)}/{safe(n.name)}\";",
            f"    router-id {_addr(n.router_id)};",
            f"    local-address {_addr(n.local_address)};",
            f"    local-as {int(n.local_asn)};",
            f"    peer-as {int(n.peer_asn)};",
            f"    hold-time {int(n.hold_time)};",
            f"    connect {int(n.port)};",
            "    group-updates true;",
        ]
        if n.multihop > 1:
            out.append(f"    outgoing-ttl {int(n.multihop)};")
        if n.password is not None:
            pw = safe(n.password)
            if '"' in pw or "\\" in pw:
                raise CommandError("password must not contain quotes or backslashes")
            out.append(f"    md5-password \"{pw}\";")
        out.append("    capability {")
        if n.graceful_restart is not None:
            out.append(f"        graceful-restart {int(n.graceful_restart)};")
        out += ["    }", "    family {"]
        out += [f"        {f} unicast;" for f in n.families if f in ("ipv4", "ipv6")]
        out += ["    }", "    api {", f"        processes [ {PROCESS} ];", "        neighbor-changes;",
                "    }"]
        mine = routes.get(n.peer_address, {})
        if mine:
            out.append("    static {")
            # One `route` per prefix: the bulk `attributes ... nlri` form is not usable in a
            # static section (its routes are never sent).
            for a, nets in grouped(mine.items(), batch):
                at = attrs_text(a)
                out += [f"        route {_net(x)} {at};" for x in nets]
            out.append("    }")
        out += ["}", ""]
    return "\n".join(out)


def exabgp_env(reactor_speed: float, run_dir: Path, async_limit: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("exabgp")}
    env.update({
        "exabgp_api_ack": "true",
        "exabgp_api_encoder": "json",
        "exabgp_api_cli": "false",
        "exabgp_api_respawn": "true",
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_pid": "",
        "exabgp_log_destination": "stdout",
        "exabgp_log_level": "INFO",
        "exabgp_log_packets": "false",
        "exabgp_log_routes": "false",
        "exabgp_log_rib": "false",
        "exabgp_log_configuration": "false",
        "exabgp_log_processes": "true",
        "exabgp_log_network": "true",
        "exabgp_tcp_bind": "",
        "exabgp_reactor_speed": f"{reactor_speed:g}",
        "exabgp_cache_attributes": "true",
        "exabgp_bgp_passive": "false",
    })
    env["PLEXUS_EXABGP_ASYNC_LIMIT"] = str(int(async_limit))  # read by bgp/launcher.py
    env["PATH"] = env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = str(run_dir)
    env["PLEXUS_PARENT_PID"] = str(os.getpid())  # bgp/launcher.py dies with this process
    return env


# ---- the supervised speaker -------------------------------------------------------------

@dataclass
class PeerState:
    state: str = "idle"
    since: float = field(default_factory=time.time)
    reason: str = ""
    flaps: int = 0

    def set(self, state: str, reason: str = "") -> None:
        if state != self.state:
            self.since = time.time()
            if self.state == "established":
                self.flaps += 1
        self.state, self.reason = state, reason


def explain(st: PeerState, n: Neighbor, now: float) -> str:
    """Why a session is not up, when ExaBGP itself says nothing (failed connects are silent)."""
    if st.state == "established" or st.reason or now - st.since < 3:
        return st.reason
    why = f"no TCP session with {n.peer_address} port {n.port} for {now - st.since:.0f}s"
    if n.password is not None:
        why += (": TCP MD5 is configured, and a peer whose password differs drops every segment "
                "silently (check the password on both sides)")
    else:
        why += ": the peer does not answer or refuses the connection"
    return why


class Speaker:
    """Runs ExaBGP for this node's neighbors and speaks its API through the bridge."""

    def __init__(self, run_dir: Path, command: list[str], *, reactor_speed: float = 0.05,
                 batch: int = 2000, backoff_max: float = 30.0, async_limit: int = 100000,
                 bulk: bool = True,
                 desired: Callable[[], Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]]] = dict,
                 on_ready: Callable[[], None] = lambda: None,
                 on_event: Callable[[str, IPAddress, str], None] = lambda *_: None) -> None:
        self.run_dir = run_dir
        self.command = command
        self.reactor_speed = reactor_speed
        self.batch = batch
        self.backoff_max = backoff_max
        self.async_limit = async_limit
        self.bulk = bulk  # use `plexus-bulk` when ExaBGP has it (False: text commands only)
        self.desired = desired
        self.on_ready = on_ready
        self.on_event = on_event
        self.neighbors: dict[IPAddress, Neighbor] = {}
        self.announced: dict[IPAddress, dict[IPNetwork, RouteAttrs]] = {}
        self.peers: dict[IPAddress, PeerState] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit = ""
        self.output: deque[str] = deque(maxlen=200)
        self._writer: asyncio.StreamWriter | None = None
        self._acks: deque[asyncio.Future[str]] = deque()
        self._ready = asyncio.Event()
        self._reconfigure = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._reader: asyncio.Future[None] | None = None
        self._connected_generation = -1
        self._pending_announced: dict[IPAddress, dict[IPNetwork, RouteAttrs]] = {}
        self._bulk_probe: asyncio.Future[str] | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "api.sock"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "exabgp.conf"

    def ready(self) -> bool:
        return self._ready.is_set()

    def configure(self, neighbors: dict[IPAddress, Neighbor]) -> None:
        """New neighbor set: ExaBGP is restarted with it (routes ride along in the config)."""
        if neighbors == self.neighbors:
            return
        self.neighbors = dict(neighbors)
        for p in list(self.peers):
            if p not in neighbors:
                del self.peers[p]
        self._reconfigure.set()

    # ---- process supervision --------------------------------------------------------
    async def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_bridge, path=str(self.socket_path))
        attempt = 0
        try:
            while True:
                if not self.neighbors:
                    self._reconfigure.clear()
                    await self._reconfigure.wait()
                    continue
                started = time.monotonic()
                self._reconfigure.clear()
                try:
                    await self._spawn()
                except (OSError, CommandError) as e:
                    self.last_exit = f"cannot start ExaBGP: {e}"
                    for st in self.peers.values():
                        st.set("idle", self.last_exit)
                    attempt += 1
                    delay = min(self.backoff_max, 0.2 * 2 ** attempt)
                    log.error("%s, retrying in %.1fs", self.last_exit, delay)
                    await asyncio.sleep(delay)
                    continue
                assert self.proc is not None
                wait = asyncio.ensure_future(self.proc.wait())
                reconf = asyncio.ensure_future(self._reconfigure.wait())
                await asyncio.wait({wait, reconf}, return_when=asyncio.FIRST_COMPLETED)
                reconf.cancel()
                if not wait.done():
                    log.info("neighbors changed: restarting ExaBGP")
                    await self._kill()
                    wait.cancel()
                    attempt = 0
                    continue
                self.last_exit = f"exited with {self.proc.returncode}"
                self._lost()
                attempt = 0 if time.monotonic() - started > 60 else attempt + 1
                delay = min(self.backoff_max, 0.2 * 2 ** attempt)
                log.warning("ExaBGP %s, restarting in %.1fs last_output=%r", self.last_exit, delay,
                            list(self.output)[-3:])
                self.restarts += 1
                await asyncio.sleep(delay)
        finally:
            await self._kill()
            self._server.close()
            self.socket_path.unlink(missing_ok=True)

    async def _spawn(self) -> None:
        desired = self.desired()
        snapshot = {p: dict(desired.get(p, {})) for p in self.neighbors}
        text = render_config(self.neighbors.values(), snapshot, self.socket_path, self.batch)
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds MD5 passwords
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)
        self._generation += 1
        self._pending_announced = snapshot
        for p in self.neighbors:
            self.peers.setdefault(p, PeerState()).set("connect")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, str(self.config_path), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=exabgp_env(self.reactor_speed, self.run_dir, self.async_limit), cwd=str(self.run_dir))
        log.info("ExaBGP started pid=%d neighbors=%d routes=%d", self.proc.pid, len(self.neighbors),
                 sum(len(r) for r in snapshot.values()))
        self._reader = asyncio.ensure_future(self._read_output(self.proc))

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            log.debug("exabgp: %s", line)
            self._note_output(line)

    def _note_output(self, line: str) -> None:
        # Connection failures only show in ExaBGP's log; keep the reason per peer.
        low = line.lower()
        for peer, st in self.peers.items():
            if str(peer) in line and st.state != "established" and (
                    "connection" in low or "fail" in low or "error" in low or "timeout" in low):
                reason = line.split(" ", 3)[-1][:200]
                n = self.neighbors.get(peer)
                if n is not None and n.password is not None and "md5" not in reason.lower():
                    reason += " (TCP MD5 is configured: a wrong password drops every SYN)"
                st.set("active", reason)

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # no NOTIFICATION: the router keeps routes per graceful restart
        await proc.wait()
        self._lost()

    def _lost(self) -> None:
        self._ready.clear()
        self.announced.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_exception(TemporaryError("ExaBGP went away"))
        for st in self.peers.values():
            st.set("idle", self.last_exit or "ExaBGP restarting")

    async def stop(self) -> None:
        await self._kill()

    # ---- the API connection ---------------------------------------------------------
    async def _on_bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        if self._connected_generation != self._generation:
            # A fresh ExaBGP holds exactly what its config carried; a respawned helper of the
            # same ExaBGP leaves its RIB (and so our view of it) as it was.
            self._connected_generation = self._generation
            self.announced = {p: dict(r) for p, r in self._pending_announced.items()}
        # Does this ExaBGP take `plexus-bulk` (bgp/launcher.py)? The probe is the first
        # command, so its answer is the first one.
        self._bulk_probe = asyncio.get_running_loop().create_future()
        self._bulk_probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._acks.append(self._bulk_probe)
        writer.write(BULK.encode() + b"\n")
        self._ready.set()
        log.info("ExaBGP API connected generation=%d", self._generation)
        self.on_ready()
        try:
            while line := await reader.readline():
                self._on_line(line.decode(errors="replace").strip())
        finally:
            if self._writer is writer:
                self._writer = None
                self._ready.clear()
                while self._acks:
                    fut = self._acks.popleft()
                    if not fut.done():
                        fut.set_exception(TemporaryError("ExaBGP API connection closed"))
            writer.close()

    def _on_line(self, line: str) -> None:
        log.debug("exabgp api: %s", line[:300])
        if line in ("done", "error", "shutdown"):
            if self._acks:
                fut = self._acks.popleft()
                if not fut.done():
                    fut.set_result(line)
            return
        if not line.startswith("{"):
            return
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if msg.get("type") != "state":
            return
        nb = msg.get("neighbor", {})
        try:
            peer = ipaddress.ip_address(nb.get("address", {}).get("peer", ""))
        except ValueError:
            return
        state = {"up": "established", "connected": "opensent", "down": "active"}.get(nb.get("state"), "")
        if not state:
            return
        reason = str(nb.get("reason", ""))[:200]
        self.peers.setdefault(peer, PeerState()).set(state, reason)
        self.on_event(state, peer, reason)

    async def bulk_supported(self) -> bool:
        """Whether the running ExaBGP answered the `plexus-bulk` probe with "done"."""
        probe = self._bulk_probe
        if probe is None or not self.bulk:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(probe), 10) == "done"
        except (TimeoutError, TemporaryError):
            return False

    async def send(self, commands: list[str]) -> None:
        """Send commands (pipelined) and wait until ExaBGP acknowledged every one."""
        if not commands:
            return
        writer = self._writer
        if writer is None or not self._ready.is_set():
            raise TemporaryError("ExaBGP is not running yet", delay=0.5)
        loop = asyncio.get_running_loop()
        futs = []
        for c in commands:
            futs.append(loop.create_future())
            self._acks.append(futs[-1])
            writer.write(safe(c).encode() + b"\n")
        await writer.drain()
        try:
            answers = await asyncio.wait_for(asyncio.gather(*futs), 60 + len(commands) * 0.5)
        except TimeoutError:
            raise TemporaryError(f"ExaBGP did not acknowledge {len(commands)} commands in time") from None
        bad = sum(1 for a in answers if a != "done")
        if bad:
            raise PermanentError(f"ExaBGP refused {bad} of {len(commands)} commands: "
                                 f"{[line for line in self.output if 'error' in line.lower()][-1:]}")


# ---- the Ops under the generic reconciler -----------------------------------------------

class RoutesOps:
    """Makes ExaBGP's announcements to one peer equal a PeerRoutes row: only the difference."""

    def __init__(self, speaker: Speaker, on_sent: Callable[[IPAddress, int, int], None] = lambda *_: None
                 ) -> None:
        self.speaker = speaker
        self.on_sent = on_sent

    async def update(self, row: PeerRoutes) -> None:
        sp = self.speaker
        if row.peer not in sp.neighbors:
            raise TemporaryError(f"peer {row.peer} is not configured in ExaBGP yet", delay=0.5)
        if not sp.ready():
            raise TemporaryError("ExaBGP is not running yet", delay=0.5)
        cur = sp.announced.setdefault(row.peer, {})
        gone = [n for n in cur if n not in row.routes]
        new = [(n, a) for n, a in row.routes.items() if cur.get(n) != a]
        await self._apply(row.peer, cur, gone, new)

    async def delete(self, row: PeerRoutes) -> None:
        sp = self.speaker
        cur = sp.announced.get(row.peer)
        if not cur or row.peer not in sp.neighbors or not sp.ready():
            sp.announced.pop(row.peer, None)
            return
        await self._apply(row.peer, cur, list(cur), [])
        sp.announced.pop(row.peer, None)

    async def prune(self, rows: Iterable[PeerRoutes]) -> None:
        keep = {r.peer for r in rows}
        for peer in [p for p in self.speaker.announced if p not in keep]:
            await self.delete(PeerRoutes(peer, {}))

    async def _apply(self, peer: IPAddress, cur: dict[IPNetwork, RouteAttrs], gone: list[IPNetwork],
                     new: list[tuple[IPNetwork, RouteAttrs]]) -> None:
        sp = self.speaker
        b = sp.batch
        if await sp.bulk_supported():
            cmds = bulk_commands(peer, gone, new, b)
        else:
            cmds = withdraw_commands(peer, gone, b) + announce_commands(peer, new, b)
        await sp.send(cmds)
        for n in gone:
            cur.pop(n, None)
        for n, a in new:
            cur[n] = a
        self.on_sent(peer, len(new), len(gone))

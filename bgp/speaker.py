"""ExaBGP as a supervised child: started with this node's neighbors, reloaded when peers
come or go, restarted with backoff when it dies, stopped without a NOTIFICATION.

Stop is not remove: on agent stop ExaBGP is killed without a NOTIFICATION, so a router
with graceful restart keeps the routes (stale) for the restart time, or until hold time
without it.

Routes never go into ExaBGP's config: it starts with its neighbors only (connecting at once,
whatever the number of routes), and the Ops send every peer's routes through the API
(`plexus-bulk`) as soon as its API connects, usually before the session is up. ExaBGP sends
no End-of-RIB of its own (`manual-eor`): the agent asks for it, per family, once a peer's
routes are queued and its session is up (`end_of_rib`), so a router with graceful restart
keeps every stale route until the fresh ones are in, and drops only what is really gone.
Every time a session comes up ExaBGP resends what it holds, and End-of-RIB follows again.

Adding or removing a peer changes only that peer in the running ExaBGP (`plexus-neighbor`,
bgp/launcher.py): the other sessions, and what they announce, stay as they are. A peer whose
settings change, or an ExaBGP not started through bgp/launcher.py, still means a restart.

A config ExaBGP's parser refuses would make it exit (and take every session down), so every
new config is checked first (`launcher.py --validate`, on one route per peer, family and
attributes): a refused one never replaces the running one, and its reason is kept for
status (`refused`) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bgp.announced import Announced
from bgp.api import ApiClient
from bgp.commands import CommandError, add_neighbors_command, end_of_rib_commands, remove_neighbor_command
from bgp.launcher import VALIDATE
from bgp.render import exabgp_env, render_config, write_config
from bgp.tables import IPAddress, IPNetwork, Neighbor, RouteAttrs
from plexus.core.reconciler import Backoff, PermanentError, TemporaryError

log = logging.getLogger(__name__)
Routes = Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]]
LAUNCHER = Path(__file__).with_name("launcher.py")
VALIDATE_TIMEOUT = 60.0
ALARMING = ("error", "critical", "refus", "problem", "invalid", "does not have", "traceback", "exception")


def sample_routes(routes: Routes) -> dict[IPAddress, dict[IPNetwork, RouteAttrs]]:
    """One prefix per peer, family and attributes: ExaBGP parses the others the same way, so
    a config with these stands for the whole one, at a fraction of the parsing time."""
    out: dict[IPAddress, dict[IPNetwork, RouteAttrs]] = {}
    for peer, nets in routes.items():
        seen: set[tuple[int, RouteAttrs]] = set()
        mine = out.setdefault(peer, {})
        for net, attrs in nets.items():
            if (net.version, attrs) not in seen:
                seen.add((net.version, attrs))
                mine[net] = attrs
    return out


@dataclass
class PeerState:
    state: str = "idle"
    since: float = field(default_factory=time.time)
    reason: str = ""
    flaps: int = 0
    end_of_rib: float = 0.0  # when End-of-RIB was sent on this session (0: not yet)

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

    def __init__(self, run_dir: Path, command: list[str], *, reactor_speed: float = 0.5,
                 batch: int = 2000, backoff_max: float = 30.0, async_limit: int = 100000,
                 bulk: bool = True, validate: bool = True, desired: Callable[[], Routes] = dict,
                 on_ready: Callable[[], None] = lambda: None,
                 on_event: Callable[[str, IPAddress, str], None] = lambda *_: None) -> None:
        self.run_dir = run_dir
        self.command = command
        self.reactor_speed = reactor_speed
        self.batch = batch
        self.backoff = Backoff(initial=0.2, maximum=backoff_max, jitter=0.0)  # 0.2 s, doubling
        self.async_limit = async_limit
        self.bulk = bulk  # use `plexus-bulk` when ExaBGP has it (False: text commands only)
        self.validate = validate  # check each config with ExaBGP's parser before it is used
        self.desired = desired
        self.on_ready = on_ready
        self.on_event = on_event
        self.neighbors: dict[IPAddress, Neighbor] = {}  # wanted
        self.loaded: dict[IPAddress, Neighbor] = {}     # in the config ExaBGP runs
        self.announced = Announced()
        self.peers: dict[IPAddress, PeerState] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.peer_changes = 0  # times peers were added or removed without a restart
        self.last_exit = ""
        self.refused = ""  # why ExaBGP's parser refused the wanted config ("" when it took it)
        self._verdicts: dict[str, str] = {}  # config text -> refusal, for the last few checked
        self.output: deque[str] = deque(maxlen=200)
        self.api = ApiClient(self.socket_path, on_connect=self._on_connect, on_state=self._on_state,
                             last_error=self._last_error)
        self._reconfigure = asyncio.Event()
        self._generation = 0
        self._connected_generation = -1
        self.eor_due: set[IPAddress] = set()  # sessions up whose End-of-RIB is not sent yet
        self._reader: asyncio.Future[None] | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "api.sock"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "exabgp.conf"

    def ready(self) -> bool:
        return self.api.ready()

    def configure(self, neighbors: dict[IPAddress, Neighbor]) -> None:
        """New neighbor set: peers added or removed in the running ExaBGP, else a restart."""
        if neighbors == self.neighbors:
            return
        self.neighbors = dict(neighbors)
        for p in list(self.peers):
            if p not in neighbors:
                del self.peers[p]
        self._reconfigure.set()

    # ---- process supervision --------------------------------------------------------
    async def run(self) -> None:
        await self.api.listen()
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
                    start = await self._startable()
                    if start is None:  # refused, and nothing accepted to fall back on
                        await self._reconfigure.wait()
                        continue
                    proc = await self._spawn(start)
                except (OSError, CommandError) as e:
                    attempt += 1
                    await self._start_failed(e, attempt)
                    continue
                if not await self._supervise(proc) and proc.returncode is None:
                    log.info("neighbors changed: restarting ExaBGP")
                    await self._kill()
                    attempt = 0
                    continue
                attempt = 0 if time.monotonic() - started > 60 else attempt + 1
                await self._exited(proc, attempt)
        finally:
            await self._kill()
            self.api.close()

    async def _start_failed(self, error: Exception, attempt: int) -> None:
        self.last_exit = f"cannot start ExaBGP: {error}"
        for st in self.peers.values():
            st.set("idle", self.last_exit)
        delay = self.backoff.delay(attempt + 1)
        log.error("%s, retrying in %.1fs", self.last_exit, delay)
        await asyncio.sleep(delay)

    async def _exited(self, proc: asyncio.subprocess.Process, attempt: int) -> None:
        said = [line for line in self.output if any(w in line.lower() for w in ALARMING)][-1:]
        self.last_exit = f"exited with {proc.returncode}" + (f": {said[0][-300:]}" if said else "")
        self._lost()
        delay = self.backoff.delay(attempt + 1)
        log.warning("ExaBGP %s, restarting in %.1fs last_output=%r", self.last_exit, delay,
                    list(self.output)[-3:])
        self.restarts += 1
        await asyncio.sleep(delay)

    async def _supervise(self, proc: asyncio.subprocess.Process) -> bool:
        """Until ExaBGP exits (True) or needs a restart for new neighbors (False); peers
        added or removed meanwhile are changed in the running ExaBGP."""
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                reconf = asyncio.ensure_future(self._reconfigure.wait())
                await asyncio.wait({exited, reconf}, return_when=asyncio.FIRST_COMPLETED)
                reconf.cancel()
                if exited.done():
                    return True
                self._reconfigure.clear()
                if self.neighbors == self.loaded:
                    self._accepted()
                    continue
                if await self._refusal(self.neighbors, self._snapshot(self.neighbors)):
                    continue  # the running ExaBGP keeps its config; the reason is reported
                if not self.ready():  # just started: its API is about to connect
                    connected = asyncio.ensure_future(self.api.wait_ready())
                    await asyncio.wait({exited, connected}, timeout=10,
                                       return_when=asyncio.FIRST_COMPLETED)
                    connected.cancel()
                    if exited.done():
                        return True
                if not await self._change_peers():
                    return False
        finally:
            exited.cancel()

    def _snapshot(self, neighbors: Mapping[IPAddress, Neighbor]
                  ) -> dict[IPAddress, dict[IPNetwork, RouteAttrs]]:
        desired = self.desired()
        return {p: dict(desired.get(p, {})) for p in neighbors}

    async def _startable(self) -> dict[IPAddress, Neighbor] | None:
        """The peers to start ExaBGP with: the wanted ones if ExaBGP's parser takes them with
        their routes; else still the wanted ones if it takes them without (a refused route
        then fails alone, through the API); else the peers ExaBGP last ran; None if it takes
        none of these."""
        wanted = dict(self.neighbors)
        routes = self._snapshot(wanted)
        reason = await self._refusal(wanted, routes)
        if not reason:
            return wanted
        if routes and not await self._check(wanted, {}):
            log.warning("starting ExaBGP although it refuses some routes; the API sends the others")
            return wanted
        if self.loaded and self.loaded != wanted and not await self._check(self.loaded, {}):
            log.warning("starting ExaBGP with the peers it last ran")
            return dict(self.loaded)
        return None

    async def _refusal(self, neighbors: Mapping[IPAddress, Neighbor], routes: Routes) -> str:
        """Check a config; a refusal is logged and reported on the peers it would change."""
        reason = await self._check(neighbors, routes)
        if not reason:
            self._accepted()
            return ""
        if reason != self.refused:
            log.warning("ExaBGP refuses the new config, keeping the running one: %s", reason)
        self.refused = reason
        for p, n in neighbors.items():
            st = self.peers.setdefault(p, PeerState())
            if self.loaded.get(p) != n or not self.loaded:
                st.reason = f"ExaBGP refused the config for this peer: {reason}"
        return reason

    def _accepted(self) -> None:
        if self.refused:
            log.info("ExaBGP takes the config again")
            for st in self.peers.values():
                if st.reason.startswith("ExaBGP refused"):
                    st.reason = ""
        self.refused = ""

    async def _check(self, neighbors: Mapping[IPAddress, Neighbor], routes: Routes) -> str:
        """Why ExaBGP's own parser refuses this config ("" if it takes it), run in a child
        process on one route per peer, family and attributes."""
        if not self.validate:
            return ""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = render_config(neighbors.values(), sample_routes(routes), self.socket_path, self.batch)
        if text in self._verdicts:
            return self._verdicts[text]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(LAUNCHER), VALIDATE, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                env=exabgp_env(self.reactor_speed, self.run_dir), cwd=str(self.run_dir))
            try:
                out, _ = await asyncio.wait_for(proc.communicate(text.encode()), VALIDATE_TIMEOUT)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        except (TimeoutError, OSError) as e:
            log.warning("cannot check the config with ExaBGP's parser, using it unchecked: %r", e)
            return ""
        reason = "" if proc.returncode == 0 else (out.decode(errors="replace").strip()[-1000:] or
                                                  f"refused (exit {proc.returncode})")
        if len(self._verdicts) >= 8:
            self._verdicts.pop(next(iter(self._verdicts)))
        self._verdicts[text] = reason
        return reason

    async def _spawn(self, neighbors: dict[IPAddress, Neighbor]) -> asyncio.subprocess.Process:
        """ExaBGP with these neighbors and no routes: it connects at once, and the Ops send
        the routes through the API."""
        text = render_config(neighbors.values(), {}, self.socket_path, self.batch)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.config_path, text)
        self._generation += 1
        self.loaded = dict(neighbors)
        self.eor_due.clear()
        for p in neighbors:
            self.peers.setdefault(p, PeerState()).set("connect")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, str(self.config_path), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=exabgp_env(self.reactor_speed, self.run_dir, self.async_limit), cwd=str(self.run_dir))
        log.info("ExaBGP started pid=%d neighbors=%d", self.proc.pid, len(neighbors))
        self._reader = asyncio.ensure_future(self._read_output(self.proc))
        return self.proc

    def only_added_or_removed(self) -> bool:
        """Every peer ExaBGP runs and still wanted is unchanged (else only a restart applies it)."""
        return bool(self.neighbors) and all(
            self.loaded[p] == n for p, n in self.neighbors.items() if p in self.loaded)

    async def _change_peers(self) -> bool:
        """Add and remove peers in the running ExaBGP; False if only a restart can."""
        if not self.only_added_or_removed() or not self.ready() or not await self.api.extended():
            return False
        wanted = dict(self.neighbors)
        added = [wanted[p] for p in wanted if p not in self.loaded]
        removed = [p for p in self.loaded if p not in wanted]
        try:
            commands = [remove_neighbor_command(p) for p in removed]
            if added:
                commands.append(add_neighbors_command(
                    render_config(added, {}, self.socket_path, self.batch)))
            await self.api.send(commands)
        except (CommandError, TemporaryError, PermanentError) as e:
            log.warning("changing ExaBGP's peers failed, restarting it instead: %s", e)
            return False
        self.peer_changes += 1
        self.loaded = wanted
        for p in removed:
            self.announced.drop(p)
            self.eor_due.discard(p)
        for n in added:
            self.peers.setdefault(n.peer_address, PeerState()).set("connect")
        self._write_config()
        log.info("ExaBGP peers changed without a restart added=%s removed=%s",
                 [str(n.peer_address) for n in added], [str(p) for p in removed])
        if added:
            self.on_ready()  # the new peers take commands now: send their routes without waiting
        return True

    def _write_config(self) -> None:
        """The config file says what ExaBGP now runs (a restart renders it afresh anyway)."""
        try:
            write_config(self.config_path, render_config(self.loaded.values(), {}, self.socket_path,
                                                         self.batch))
        except (OSError, CommandError) as e:
            log.warning("cannot rewrite %s: %s", self.config_path, e)

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            if any(w in line.lower() for w in ALARMING):
                log.warning("exabgp: %s", line)  # why a peer or the whole config failed
            else:
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

    def _last_error(self) -> str:
        return str([line for line in self.output if "error" in line.lower()][-1:])

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # no NOTIFICATION: the router keeps routes per graceful restart
        await proc.wait()
        self._lost()

    def _lost(self) -> None:
        self.announced.clear()
        self.eor_due.clear()
        self.api.disconnect("ExaBGP went away")
        for st in self.peers.values():
            st.set("idle", self.last_exit or "ExaBGP restarting")

    async def stop(self) -> None:
        await self._kill()

    # ---- API events -----------------------------------------------------------------
    def _on_connect(self) -> None:
        if self._connected_generation != self._generation:
            # A fresh ExaBGP holds no routes; a respawned helper of the same ExaBGP leaves
            # its RIB (and so our view of it) as it was.
            self._connected_generation = self._generation
            self.announced.clear()
        log.info("ExaBGP API connected generation=%d", self._generation)
        self.on_ready()

    def _on_state(self, peer: IPAddress, state: str, reason: str) -> None:
        if peer in self.neighbors:  # a removed peer still reports its session going down
            st = self.peers.setdefault(peer, PeerState())
            st.set(state, reason)
            if state == "established":
                # ExaBGP resends what it holds on every new session; End-of-RIB follows it
                # once the Ops have queued what is wanted (see end_of_rib).
                self.eor_due.add(peer)
                st.end_of_rib = 0.0
        self.on_event(state, peer, reason)

    # ---- what the Ops use -----------------------------------------------------------
    def serves(self, peer: IPAddress) -> bool:
        """Whether ExaBGP runs a session with the peer, so commands for it can be sent."""
        return peer in self.loaded

    async def bulk_supported(self) -> bool:
        """Whether the running ExaBGP answered the `plexus-bulk` probe with "done"."""
        return self.bulk and await self.api.extended()

    async def send(self, commands: list[str]) -> None:
        """Send commands (pipelined) and wait until ExaBGP acknowledged every one."""
        await self.api.send(commands)

    async def end_of_rib(self, peer: IPAddress) -> bool:
        """Send End-of-RIB for each of the peer's families if its session came up since the
        last one, and the Ops queued its routes (they call this only then): ExaBGP sends it
        once everything queued before it went out. False when it is not due or the session
        went down meanwhile (the next session asks again)."""
        n, st = self.loaded.get(peer), self.peers.get(peer)
        if peer not in self.eor_due or n is None or st is None or st.state != "established":
            return False
        try:
            await self.send(end_of_rib_commands(peer, n.families, await self.bulk_supported()))
        except PermanentError:  # ExaBGP has no established session with the peer any more
            log.info("End-of-RIB to %s not sent: its session is down", peer)
            return False
        self.eor_due.discard(peer)
        st.end_of_rib = time.time()
        log.info("End-of-RIB sent to %s families=%s", peer, ",".join(n.families))
        return True

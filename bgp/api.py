"""ExaBGP's process API as the agent sees it: a unix socket the bridge connects to.

ExaBGP runs bgp/bridge.py as its API process; the bridge relays its stdin/stdout to this
socket. Commands are pipelined: each is written at once and its acknowledgement ("done" or
"error", ExaBGP answers in order) resolves the oldest waiting future. Everything ExaBGP
writes is read all the time, so it never blocks on a full pipe; JSON state messages
become peer state callbacks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

from bgp.commands import probe_command, safe
from bgp.tables import IPAddress
from plexus.core.reconciler import PermanentError, TemporaryError

log = logging.getLogger(__name__)
STATES = {"up": "established", "connected": "opensent", "down": "active"}


class ApiClient:
    """Pipelined commands to ExaBGP over the bridge socket; acknowledgements read in order."""

    def __init__(self, socket_path: Path, *,
                 on_connect: Callable[[], None] = lambda: None,
                 on_state: Callable[[IPAddress, str, str], None] = lambda *_: None,
                 last_error: Callable[[], str] = str) -> None:
        self.socket_path = socket_path
        self.on_connect = on_connect
        self.on_state = on_state
        self.last_error = last_error
        self._writer: asyncio.StreamWriter | None = None
        self._acks: deque[asyncio.Future[str]] = deque()
        self._ready = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._probe: asyncio.Future[str] | None = None

    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def listen(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_bridge, path=str(self.socket_path))

    def close(self) -> None:
        self.disconnect("ExaBGP API closed")
        if self._server is not None:
            self._server.close()
            self._server = None
        self.socket_path.unlink(missing_ok=True)

    def disconnect(self, reason: str) -> None:
        """ExaBGP went away: every command still waiting fails as temporary."""
        self._ready.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._fail_waiting(reason)

    def _fail_waiting(self, reason: str) -> None:
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_exception(TemporaryError(reason))

    async def _on_bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        # Was ExaBGP started through bgp/launcher.py (`plexus-bulk`, `plexus-neighbor`)? The
        # probe is the first command, so its answer is the first one.
        self._probe = asyncio.get_running_loop().create_future()
        self._probe.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._acks.append(self._probe)
        writer.write(probe_command().encode() + b"\n")
        self._ready.set()
        self.on_connect()
        try:
            while line := await reader.readline():
                self._on_line(line.decode(errors="replace").strip())
        finally:
            if self._writer is writer:
                self._writer = None
                self._ready.clear()
                self._fail_waiting("ExaBGP API connection closed")
            writer.close()

    def _on_line(self, line: str) -> None:
        log.debug("exabgp api: %s", line[:300])
        if line in ("done", "error", "shutdown"):
            if self._acks:
                fut = self._acks.popleft()
                if not fut.done():
                    fut.set_result(line)
            return
        if line.startswith("{"):
            self._on_message(line)

    def _on_message(self, line: str) -> None:
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
        state = STATES.get(nb.get("state"), "")
        if state:
            self.on_state(peer, state, str(nb.get("reason", ""))[:200])

    async def extended(self) -> bool:
        """Whether the running ExaBGP answered the probe with "done" (bgp/launcher.py)."""
        probe = self._probe
        if probe is None:
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
            raise PermanentError(f"ExaBGP refused {bad} of {len(commands)} commands: {self.last_error()}")

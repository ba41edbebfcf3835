"""List a prefix of etcd, then watch it from the listed revision on: the one way to follow etcd.

`ListWatch.updates()` yields, in order:

- `Relisted`: every key under the prefix at one revision, and the keys the consumer holds
  that vanished since (deleted while disconnected, or while a compacted watch was blind);
- `Synced`: the list before it is applied; the consumer's view equals etcd's at `revision`;
- `Changed`: a batch of puts and deletes from the watch, in etcd's order.

A watch whose start revision was compacted is relisted at once. Other kvstore errors end
the iteration, unless `reconnect` is given: then the helper waits with that backoff and
relists, so a consumer without a session loop of its own survives outages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from clustermesh.kvstore import KV, Compacted, Event, KvError
from plexus.core.reconciler import Backoff

log = logging.getLogger(__name__)


class Source(Protocol):
    """What ListWatch needs of a kvstore (KvStore has it)."""

    async def list_prefix(self, prefix: str) -> tuple[list[KV], int]: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[list[Event], int]]: ...


@dataclass(frozen=True)
class Relisted:
    """A full list at `revision`: these items replace what the consumer held."""

    items: tuple[KV, ...]
    vanished: frozenset[str]
    revision: int


@dataclass(frozen=True)
class Synced:
    """The consumer has applied the list at `revision`; `first` for this helper's first list."""

    revision: int
    first: bool


@dataclass(frozen=True)
class Changed:
    """Watch events after a list, in etcd's order; never empty."""

    events: tuple[Event, ...]
    revision: int


Update = Relisted | Synced | Changed


@dataclass
class WatchStatus:
    """What a status page shows of one followed prefix."""

    prefix: str
    synced: bool = False
    revision: int = 0
    relists: int = 0
    compactions: int = 0
    events: int = 0
    errors: int = 0
    last_error: str = ""
    last_error_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "synced": self.synced, "revision": self.revision,
                "relists": self.relists, "compactions": self.compactions, "events": self.events,
                "errors": self.errors, "lastError": self.last_error}


@dataclass
class ListWatch:
    """Follows one prefix; reuse the same object across sessions so `vanished` stays right.

    `keys` is what the consumer holds: it changes only once the consumer asks for the next
    update, so a consumer cancelled halfway through applying one is told again on relist.
    """

    kv: Source
    prefix: str
    reconnect: Backoff | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    keys: set[str] = field(default_factory=set)
    status: WatchStatus = field(init=False)

    def __post_init__(self) -> None:
        self.status = WatchStatus(self.prefix)

    async def updates(self) -> AsyncGenerator[Update, None]:
        failures = 0
        try:
            while True:
                try:
                    async for update in self._list_and_watch():
                        failures = 0
                        yield update
                except Compacted as e:
                    self.status.compactions += 1
                    log.info("watch prefix=%s compacted at revision %d: relisting",
                             self.prefix, e.revision)
                except KvError as e:
                    self._failed(e)
                    if self.reconnect is None:
                        raise
                    failures += 1
                    await self.sleep(self.reconnect.delay(failures))
        finally:
            self.status.synced = False  # nobody follows the prefix any more

    async def _list_and_watch(self) -> AsyncIterator[Update]:
        items, revision = await self.kv.list_prefix(self.prefix)
        fresh = {i.key for i in items}
        self.status.relists += 1
        yield Relisted(tuple(items), frozenset(self.keys - fresh), revision)
        self.keys = fresh
        self.status.synced, self.status.revision = True, revision
        yield Synced(revision, first=self.status.relists == 1)
        async for events, at in self.kv.watch(self.prefix, revision + 1):
            self.status.revision = max(self.status.revision, at)
            if not events:
                continue  # progress notification
            self.status.events += len(events)
            yield Changed(tuple(events), at)
            for ev in events:
                if ev.kind == "put":
                    self.keys.add(ev.key)
                else:
                    self.keys.discard(ev.key)

    def _failed(self, e: KvError) -> None:
        st = self.status
        st.synced = False
        st.errors += 1
        st.last_error, st.last_error_time = str(e), time.time()
        log.warning("watch prefix=%s failed: %s", self.prefix, e)

"""Typed in-memory tables of desired state.

Watchers (etcd, the CNI endpoint API, manifests) write rows; reconcilers read them.
A row is a frozen dataclass; a table is keyed by a function of the row. Readers follow
changes through `watch()`, which coalesces: a burst of writes to one key wakes a reader
once, and the reader reads the current row (or finds it gone).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class _Watcher(Generic[K]):
    def __init__(self) -> None:
        self.keys: set[K] = set()
        self.wake = asyncio.Event()
        self.closed = False

    def notify(self, key: K) -> None:
        self.keys.add(key)
        self.wake.set()


class Table(Generic[K, R]):
    """A keyed set of rows with change notification and an "initialized" gate.

    `initialized` is set once every registered initializer has said done; a reconciler
    never prunes before that, so a half-synced table can never delete live state.
    """

    def __init__(self, name: str, key: Callable[[R], K]) -> None:
        self.name = name
        self._key = key
        self._rows: dict[K, R] = {}
        self._watchers: list[_Watcher[K]] = []
        self._pending_init: set[str] = set()
        self.initialized = asyncio.Event()
        self.initialized.set()
        self.revision = 0

    # ---- initialization -------------------------------------------------------------
    def register_initializer(self, name: str) -> Callable[[], None]:
        """Hold `initialized` until the returned function is called."""
        self._pending_init.add(name)
        self.initialized.clear()

        def done() -> None:
            self._pending_init.discard(name)
            if not self._pending_init:
                self.initialized.set()

        return done

    @property
    def pending_initializers(self) -> frozenset[str]:
        return frozenset(self._pending_init)

    # ---- reads ----------------------------------------------------------------------
    def key_of(self, row: R) -> K:
        return self._key(row)

    def get(self, key: K) -> R | None:
        return self._rows.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[R]:
        return iter(list(self._rows.values()))

    def all(self) -> list[R]:
        return list(self._rows.values())

    def items(self) -> list[tuple[K, R]]:
        return list(self._rows.items())

    def where(self, predicate: Callable[[R], bool]) -> list[R]:
        return [r for r in self._rows.values() if predicate(r)]

    # ---- writes ---------------------------------------------------------------------
    def upsert(self, row: R) -> bool:
        """Insert or replace; returns False (and wakes nobody) when nothing changed."""
        key = self._key(row)
        if self._rows.get(key) == row:
            return False
        self._rows[key] = row
        self._changed(key)
        return True

    def delete(self, key: K) -> R | None:
        row = self._rows.pop(key, None)
        if row is not None:
            self._changed(key)
        return row

    def delete_where(self, predicate: Callable[[R], bool]) -> list[R]:
        gone = [k for k, r in self._rows.items() if predicate(r)]
        return [r for k in gone if (r := self.delete(k)) is not None]

    def replace_where(self, predicate: Callable[[R], bool], rows: Iterable[R]) -> None:
        """Make the subset selected by `predicate` exactly `rows` (a resync)."""
        fresh = {self._key(r): r for r in rows}
        for key, row in list(self._rows.items()):
            if predicate(row) and key not in fresh:
                self.delete(key)
        for row in fresh.values():
            self.upsert(row)

    def _changed(self, key: K) -> None:
        self.revision += 1
        for w in self._watchers:
            w.notify(key)

    # ---- change feed ----------------------------------------------------------------
    async def watch(self, *, replay: bool = True) -> AsyncGenerator[set[K], None]:
        """Yield sets of changed keys; the first batch holds every key when `replay`."""
        w: _Watcher[K] = _Watcher()
        self._watchers.append(w)
        try:
            if replay:
                w.keys.update(self._rows)
                w.wake.set()
            while True:
                await w.wake.wait()
                w.wake.clear()
                keys, w.keys = w.keys, set()
                if keys:
                    yield keys
        finally:
            self._watchers.remove(w)

"""Typed in-memory tables of desired state.

Watchers (etcd, the CNI endpoint API, manifests) write rows; reconcilers read them.
A row is a frozen dataclass; a table is keyed by a function of the row, and may keep
secondary indexes (say, by cluster) so that counting, listing, replacing or deleting the
rows of one index value touches only those rows. Readers follow
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


class Tracker(Generic[K]):
    """The keys written since the last `take()`, for a reader that recomputes on its own
    schedule (synchronously) and wants to read again only what changed."""

    def __init__(self) -> None:
        self.keys: set[K] = set()

    def notify(self, key: K) -> None:
        self.keys.add(key)

    def take(self) -> set[K]:
        keys, self.keys = self.keys, set()
        return keys


class Table(Generic[K, R]):
    """A keyed set of rows with change notification and an "initialized" gate.

    `initialized` is set once every registered initializer has said done; a reconciler
    never prunes before that, so a half-synced table can never delete live state.
    """

    def __init__(self, name: str, key: Callable[[R], K],
                 indexes: dict[str, Callable[[R], Hashable]] | None = None) -> None:
        self.name = name
        self._key = key
        self._rows: dict[K, R] = {}
        self._index_of: dict[str, Callable[[R], Hashable]] = dict(indexes or {})
        # index name -> index value -> the rows with that value, by key
        self._indexes: dict[str, dict[Hashable, dict[K, R]]] = {n: {} for n in self._index_of}
        self._watchers: list[_Watcher[K] | Tracker[K]] = []
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

    def _index(self, index: str) -> dict[Hashable, dict[K, R]]:
        try:
            return self._indexes[index]
        except KeyError:
            raise KeyError(f"table {self.name} has no index {index!r}; "
                           f"it has {', '.join(self._indexes) or 'none'}") from None

    def by(self, index: str, value: Hashable) -> list[R]:
        """The rows whose `index` is `value`, without looking at any other row."""
        return list(self._index(index).get(value, {}).values())

    def keys_by(self, index: str, value: Hashable) -> list[K]:
        return list(self._index(index).get(value, {}))

    def count(self, index: str, value: Hashable) -> int:
        return len(self._index(index).get(value, ()))

    def index_values(self, index: str) -> list[Hashable]:
        return list(self._index(index))

    # ---- writes ---------------------------------------------------------------------
    def upsert(self, row: R) -> bool:
        """Insert or replace; returns False (and wakes nobody) when nothing changed."""
        key = self._key(row)
        old = self._rows.get(key)
        if old == row:
            return False
        self._rows[key] = row
        if self._index_of:
            if old is not None:
                self._unindex(key, old)
            for name, of in self._index_of.items():
                self._indexes[name].setdefault(of(row), {})[key] = row
        self._changed(key)
        return True

    def delete(self, key: K) -> R | None:
        row = self._rows.pop(key, None)
        if row is not None:
            if self._index_of:
                self._unindex(key, row)
            self._changed(key)
        return row

    def _unindex(self, key: K, row: R) -> None:
        for name, of in self._index_of.items():
            value = of(row)
            bucket = self._indexes[name].get(value)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._indexes[name][value]

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

    def delete_in(self, index: str, value: Hashable) -> list[R]:
        """Delete the rows whose `index` is `value`; no other row is looked at."""
        return [r for k in self.keys_by(index, value) if (r := self.delete(k)) is not None]

    def replace_in(self, index: str, value: Hashable, rows: Iterable[R]) -> None:
        """Make the rows whose `index` is `value` exactly `rows` (a resync of, say, one
        cluster): the cost grows with that subset, not with the table."""
        fresh = {self._key(r): r for r in rows}
        for key in self.keys_by(index, value):
            if key not in fresh:
                self.delete(key)
        for row in fresh.values():
            self.upsert(row)

    def _changed(self, key: K) -> None:
        self.revision += 1
        for w in self._watchers:
            w.notify(key)

    # ---- change feed ----------------------------------------------------------------
    def track(self) -> Tracker[K]:
        """A tracker of the keys written from now on (it starts empty)."""
        t: Tracker[K] = Tracker()
        self._watchers.append(t)
        return t

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

"""The one generic reconciler: tables in, target state out.

Each target (a BPF map, a WireGuard device, routes, an ExaBGP process) gets one Ops class
with idempotent `update`, `delete` and `prune`. The reconciler owns everything around it:
per-object queues (one object in order, objects in parallel), retries with exponential
backoff, periodic prune once the table is initialized, and per-object status.

An Ops class may also offer `update_batch(rows)` (a BPF map's one-syscall batch update):
then a burst of updates (a full sync) goes out in batches, and a batch that fails is
applied again one row at a time, so every row still gets its own status, error and retry.

Failures, by what the Ops raises:
- `TemporaryError` (and any other exception, an Ops bug included): retried after a
  backoff that grows with each attempt, or after the error's own `delay`.
- `PermanentError`: the target refuses the row as it is. Not retried with backoff, nor by
  the periodic refresh; retried when the row changes (or is deleted), and by `requeue_all`
  (the target restarted and starts over). Shown in status and health until then.

Every `refresh_every` prunes, the rows the target holds are applied again, so what someone
changed behind our back comes back; a row still pending or waiting out its backoff is on
its way already and is left alone.

Time comes from an injectable `Clock` (plexus.core.clock): retries, backoff, the prune
interval and the refresh follow it, so tests drive them by hand.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from plexus.core.clock import Clock, SystemClock
from plexus.core.metrics import ReconcilerMetrics
from plexus.core.tables import Table

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)

log = logging.getLogger(__name__)


class TemporaryError(Exception):
    """Retry later; `delay` overrides the backoff when given."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(Exception):
    """The target refuses the row as it is: retried only when the row changes (or by
    `requeue_all`), never by backoff or the periodic refresh; shown in status and health."""


class Ops(Protocol[R_contra]):
    async def update(self, row: R_contra) -> None: ...
    async def delete(self, row: R_contra) -> None: ...
    async def prune(self, rows: Iterable[R_contra]) -> None:
        """Remove from the target what no row names. `rows` is read when first iterated: an
        Ops that reads a large target in a thread iterates it afterwards, so a row the table
        gained meanwhile is kept."""


class BatchOps(Ops[R_contra], Protocol[R_contra]):
    """Optional: apply many updates at once; the same end state as `update` of each row."""

    async def update_batch(self, rows: Sequence[R_contra]) -> None: ...


class State(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    ERROR = "error"


@dataclass
class Status:
    state: State = State.PENDING
    error: str = ""
    attempts: int = 0
    updated: float = 0.0  # wall-clock time of the last change of state
    permanent: bool = False  # the error is a PermanentError: waits for the row to change

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "error": self.error, "attempts": self.attempts,
                "permanent": self.permanent}


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter))


class Reconciler(Generic[K, R]):
    """Drive `ops` so the target holds exactly the rows of `table`."""

    def __init__(
        self,
        name: str,
        table: Table[K, R],
        ops: Ops[R],
        *,
        metrics: ReconcilerMetrics | None = None,
        backoff: Backoff = Backoff(),
        prune_interval: float = 60.0,
        refresh_every: int = 5,
        concurrency: int = 16,
        batch_size: int = 1024,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.clock: Clock = clock or SystemClock()
        self.table = table
        self.ops = ops
        self.metrics = metrics or ReconcilerMetrics.disabled()
        self.metrics.track(name, self.counts)
        self.backoff = backoff
        self.prune_interval = prune_interval
        # Every `refresh_every` prunes, every applied row is applied again: what someone
        # changed behind our back (a deleted route, a flushed map entry) comes back. 0 disables.
        self.refresh_every = refresh_every
        self.status: dict[K, Status] = {}
        self.applied: dict[K, R] = {}
        self.last_prune_error = ""
        self.pruned_once = asyncio.Event()
        self._dirty: set[K] = set()
        self._running: set[K] = set()
        self._retry_at: dict[K, float] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        # Updates go out `batch_size` rows at a time when the target can take them so.
        self._update_batch: Callable[[Sequence[R]], Awaitable[None]] | None = (
            getattr(ops, "update_batch", None) if batch_size > 1 else None)
        self.batch_size = batch_size
        self._one_by_one: set[K] = set()  # keys whose batch failed: per row until they succeed
        self._prune_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # A prune reads the rows, then the target: a row applied in between looks like a
        # stray to it. Rows applied while a prune runs are applied again once it is over.
        self._pruning = False
        self._applied_during_prune: set[K] = set()

    # ---- public ---------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled. Stopping leaves the target as it is (stop is not remove)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_table())
            tg.create_task(self._dispatch())
            tg.create_task(self._prune_loop())

    def request_prune(self) -> None:
        self._prune_requested.set()

    def requeue_all(self) -> None:
        """Re-apply every row, e.g. after the target restarted and lost its state; rows it
        refused for good are tried again too, as the new target may take them."""
        self.applied.clear()
        self._mark([k for k, _ in self.table.items()])

    def requeue(self, keys: Iterable[K]) -> None:
        """Apply these rows again: their target changed behind our back (e.g. a device made
        anew with a new index)."""
        self._mark([k for k in keys if self.table.get(k) is not None])

    def errors(self) -> dict[K, str]:
        return {k: s.error for k, s in self.status.items() if s.state is State.ERROR}

    def counts(self) -> dict[str, int]:
        """Objects by state: pending, done, error."""
        counts = {s.value: 0 for s in State}
        for st in list(self.status.values()):  # a copy: metrics may read from another thread
            counts[st.state.value] += 1
        return counts

    def last_error(self) -> str:
        """The most recent error of an object still in error, with its key."""
        failed = [(st.updated, k, st.error) for k, st in list(self.status.items())
                  if st.state is State.ERROR]
        if not failed:
            return ""
        _, key, error = max(failed, key=lambda f: f[0])
        return f"{key}: {error}"

    def summary(self) -> dict[str, object]:
        return {
            "objects": self.counts(),
            "errors": {str(k): e for k, e in list(self.errors().items())[:20]},
            "last_error": self.last_error(),
            "prune_error": self.last_prune_error,
            "initialized": self.table.initialized.is_set(),
        }

    def settled(self) -> bool:
        """True when every row is applied and nothing is in flight or waiting."""
        return (
            not self._dirty
            and not self._running
            and all(s.state is State.DONE for s in self.status.values())
        )

    # ---- internals ------------------------------------------------------------------
    def _mark(self, keys: Iterable[K]) -> None:
        for k in keys:
            self._dirty.add(k)
            self._retry_at.pop(k, None)
            st = self.status.get(k)
            if st is None or st.state is not State.PENDING:
                self.status[k] = Status(attempts=0, updated=self.clock.time())
        self._wake.set()

    def _refresh(self) -> None:
        """Apply again the rows the target holds (see the module docstring)."""
        self._mark([k for k, _ in self.table.items()
                    if (st := self.status.get(k)) is None or st.state is State.DONE])

    async def _follow_table(self) -> None:
        async for keys in self.table.watch():
            self._mark(keys)

    async def _dispatch(self) -> None:
        while True:
            now = self.clock.now()
            ready = [k for k in self._dirty if k not in self._running and self._retry_at.get(k, 0) <= now]
            batch: list[K] = []
            for key in ready:
                self._dirty.discard(key)
                self._running.add(key)
                if (self._update_batch is not None and key not in self._one_by_one
                        and self.table.get(key) is not None):
                    batch.append(key)
                else:
                    self._spawn(self._reconcile_one(key))
            if len(batch) == 1:
                self._spawn(self._reconcile_one(batch[0]))
            elif batch:
                for i in range(0, len(batch), self.batch_size):
                    self._spawn(self._reconcile_batch(batch[i:i + self.batch_size]))
            if not self._dirty:
                # A set never shrinks: after a sync of 100k rows, walking even an empty one
                # costs a millisecond on every wake-up. Start afresh.
                self._dirty = set()
            self._wake.clear()
            retries = [t for k, t in self._retry_at.items() if k in self._dirty]
            await self.clock.wait_until(min(retries) if retries else None, self._wake)

    async def _reconcile_one(self, key: K) -> None:
        async with self._slots:
            row = self.table.get(key)
            old = self.applied.get(key)
            st = self.status.setdefault(key, Status(updated=self.clock.time()))
            st.attempts += 1
            op = "update" if row is not None else "delete"
            started = self.clock.now()
            try:
                if row is not None:
                    await self.ops.update(row)
                elif old is not None:
                    await self.ops.delete(old)
            except PermanentError as e:
                self._fail(key, st, op, str(e), retry=None)
            except TemporaryError as e:
                self._fail(key, st, op, str(e), retry=-1.0 if e.delay is None else e.delay)
            except Exception as e:  # an Ops bug is retried like a temporary error
                log.exception("reconciler=%s key=%s %s raised", self.name, key, op)
                self._fail(key, st, op, f"{type(e).__name__}: {e}", retry=-1.0)
            else:
                self.metrics.observe(self.name, op, self.clock.now() - started, ok=True)
                self._one_by_one.discard(key)
                if row is not None:
                    self.applied[key] = row
                    st.state, st.error, st.updated = State.DONE, "", self.clock.time()
                    st.permanent = False
                    if self._pruning:
                        self._applied_during_prune.add(key)
                else:
                    self.applied.pop(key, None)
                    self.status.pop(key, None)
            finally:
                self._running.discard(key)
                self._wake.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile_batch(self, keys: list[K]) -> None:
        """Update many rows in one call; should it fail, each row goes again on its own."""
        assert self._update_batch is not None
        async with self._slots:
            rows = [(k, self.table.get(k)) for k in keys]
            present = [(k, r, self.status.setdefault(k, Status(updated=self.clock.time())))
                       for k, r in rows if r is not None]
            for _, _, st in present:
                st.attempts += 1
            started = self.clock.now()
            try:
                if present:
                    await self._update_batch([r for _, r, _ in present])
            except Exception as e:
                log.info("reconciler=%s batch of %d failed, applying one by one: %s: %s",
                         self.name, len(present), type(e).__name__, e)
                for _, _, st in present:
                    st.attempts -= 1  # the one-row attempt counts instead
                self._one_by_one.update(keys)
                self._dirty.update(keys)
            else:
                each = (self.clock.now() - started) / max(1, len(present))
                now = self.clock.time()
                for key, row, st in present:
                    self.metrics.observe(self.name, "update", each, ok=True)
                    self.applied[key] = row
                    st.state, st.error, st.updated = State.DONE, "", now
                    st.permanent = False
                if self._pruning:
                    self._applied_during_prune.update(k for k, _, _ in present)
                # deleted since dispatch: the one-row path applies the delete
                self._dirty.update(k for k, r in rows if r is None)
            finally:
                self._running.difference_update(keys)
                self._wake.set()

    def _fail(self, key: K, st: Status, op: str, message: str, retry: float | None) -> None:
        self.metrics.observe(self.name, op, 0.0, ok=False)
        st.state, st.error, st.updated = State.ERROR, message, self.clock.time()
        st.permanent = retry is None
        if retry is None:
            log.warning("reconciler=%s key=%s %s failed permanently: %s", self.name, key, op, message)
            return
        delay = retry if retry >= 0 else self.backoff.delay(st.attempts)
        log.info("reconciler=%s key=%s %s failed (attempt %d), retry in %.2fs: %s",
                 self.name, key, op, st.attempts, delay, message)
        self._retry_at[key] = self.clock.now() + delay
        self._dirty.add(key)

    def _rows_when_read(self) -> Iterator[R]:
        yield from self.table.all()

    async def _prune_loop(self) -> None:
        await self.table.initialized.wait()
        rounds = 0
        while True:
            started = self.clock.now()
            self._pruning = True
            try:
                await self.ops.prune(self._rows_when_read())
                self.last_prune_error = ""
                self.metrics.observe(self.name, "prune", self.clock.now() - started, ok=True)
            except Exception as e:
                self.last_prune_error = f"{type(e).__name__}: {e}"
                self.metrics.observe(self.name, "prune", 0.0, ok=False)
                log.warning("reconciler=%s prune failed: %s", self.name, e)
            finally:
                self._pruning = False
            if self._applied_during_prune:
                again = [k for k in self._applied_during_prune if self.table.get(k) is not None]
                self._applied_during_prune = set()
                self._mark(again)
            self.pruned_once.set()
            rounds += 1
            if self.refresh_every and rounds % self.refresh_every == 0:
                self._refresh()
            self._prune_requested.clear()
            await self.clock.wait_until(self.clock.now() + self.prune_interval, self._prune_requested)

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from plexus.core.clock import ManualClock
from plexus.core.reconciler import Backoff, PermanentError, Reconciler, State, TemporaryError
from plexus.core.tables import Table
from tests.support import eventually


@dataclass(frozen=True)
class Row:
    name: str
    value: int = 0


@dataclass
class FakeTarget:
    """An in-memory target whose operations can be made to fail."""

    state: dict[str, int] = field(default_factory=dict)
    fail_update: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    prunes: int = 0

    async def update(self, row: Row) -> None:
        self.calls.append(("update", row.name))
        errors = self.fail_update.get(row.name)
        if errors:
            raise errors.pop(0)
        self.state[row.name] = row.value

    async def delete(self, row: Row) -> None:
        self.calls.append(("delete", row.name))
        self.state.pop(row.name, None)

    async def prune(self, rows: Iterable[Row]) -> None:
        self.prunes += 1
        keep = {r.name for r in rows}
        for k in list(self.state):
            if k not in keep:
                del self.state[k]


FAST = Backoff(initial=0.01, maximum=0.05)


async def run(rec: Reconciler[str, Row]) -> asyncio.Task[None]:
    return asyncio.create_task(rec.run())


async def test_applies_updates_and_deletes() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget()
    rec = Reconciler("fake", t, target, backoff=FAST)
    task = await run(rec)
    t.upsert(Row("a", 1))
    t.upsert(Row("b", 2))
    await eventually(lambda: target.state == {"a": 1, "b": 2})
    t.delete("a")
    await eventually(lambda: target.state == {"b": 2})
    assert "a" not in rec.status
    assert rec.status["b"].state is State.DONE
    task.cancel()


async def test_temporary_errors_are_retried_with_backoff() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"a": [TemporaryError("busy"), RuntimeError("bug")]})
    rec = Reconciler("fake", t, target, backoff=FAST)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: target.state == {"a": 1})
    assert target.calls.count(("update", "a")) == 3
    assert rec.status["a"].state is State.DONE and rec.status["a"].error == ""
    task.cancel()


async def test_temporary_error_delay_is_respected() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"a": [TemporaryError("later", delay=0.3)]})
    rec = Reconciler("fake", t, target, backoff=FAST)
    task = await run(rec)
    loop = asyncio.get_running_loop()
    start = loop.time()
    t.upsert(Row("a", 1))
    await eventually(lambda: target.state == {"a": 1})
    assert loop.time() - start >= 0.3
    task.cancel()


async def test_permanent_error_is_shown_and_not_retried_until_row_changes() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"a": [PermanentError("invalid row")]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=FAST, prune_interval=3600, clock=clock)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: rec.status.get("a") and rec.status["a"].state is State.ERROR)
    assert rec.errors() == {"a": "invalid row"}
    calls = len(target.calls)
    for _ in range(10):  # would have retried several times with FAST backoff
        clock.advance(0.1)
        await settle()
    assert len(target.calls) == calls
    assert rec.status["a"].permanent and rec.last_error() == "a: invalid row"
    t.upsert(Row("a", 2))
    await eventually(lambda: target.state == {"a": 2})
    task.cancel()


async def test_prune_waits_for_initialized_then_removes_strays() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    done = t.register_initializer("source")
    target = FakeTarget(state={"stray": 9})
    rec = Reconciler("fake", t, target, backoff=FAST, prune_interval=3600)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: target.state.get("a") == 1)
    assert target.prunes == 0 and "stray" in target.state
    done()
    await eventually(lambda: target.state == {"a": 1})
    target.state["another"] = 1
    rec.request_prune()
    await eventually(lambda: target.state == {"a": 1})
    task.cancel()


@dataclass
class SlowReadTarget(FakeTarget):
    """A prune that yields before it has read the target (as a large map is read in a
    thread), and reads its rows only after."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def prune(self, rows: Iterable[Row]) -> None:
        self.started.set()
        await self.go.wait()
        present = dict(self.state)
        keep = {r.name for r in rows}
        for k in present.keys() - keep:
            self.state.pop(k, None)


async def test_prune_keeps_rows_added_while_it_waited() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = SlowReadTarget(state={"stray": 9})
    rec = Reconciler("fake", t, target, backoff=FAST, prune_interval=3600)
    task = await run(rec)
    await asyncio.wait_for(target.started.wait(), 5)
    # added and applied after the prune began, before it read the target: rows handed to the
    # prune at its start would not name it, and it would be deleted
    t.upsert(Row("late", 1))
    await eventually(lambda: target.state.get("late") == 1)
    target.go.set()
    await asyncio.wait_for(rec.pruned_once.wait(), 5)
    assert target.state == {"late": 1}
    task.cancel()


async def test_one_object_in_order_objects_in_parallel() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    active: set[str] = set()
    overlap: list[str] = []
    peak = 0

    class Slow(FakeTarget):
        async def update(self, row: Row) -> None:
            nonlocal peak
            if row.name in active:
                overlap.append(row.name)
            active.add(row.name)
            peak = max(peak, len(active))
            await asyncio.sleep(0.02)
            active.discard(row.name)
            await super().update(row)

    target = Slow()
    rec = Reconciler("fake", t, target, backoff=FAST)
    task = await run(rec)
    for i in range(10):
        t.upsert(Row(f"k{i}", 0))
    await asyncio.sleep(0)
    for v in range(5):
        t.upsert(Row("k0", v + 1))
        await asyncio.sleep(0.005)
    await eventually(lambda: target.state.get("k0") == 5 and len(target.state) == 10)
    assert overlap == []
    assert peak > 1
    task.cancel()


def test_backoff_grows_and_caps() -> None:
    b = Backoff(initial=1, maximum=8, factor=2, jitter=0)
    assert [b.delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 8]


async def test_refresh_repairs_drift_behind_its_back() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget()
    rec = Reconciler("fake", t, target, backoff=FAST, prune_interval=0.05, refresh_every=2)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: target.state == {"a": 1})
    target.state.clear()  # someone removed it outside the reconciler
    await eventually(lambda: target.state == {"a": 1}, 5, what="refresh re-applied the row")
    task.cancel()


@dataclass
class BatchTarget(FakeTarget):
    """A target that also takes many updates at once, and refuses a batch holding a bad row."""

    batches: list[int] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)

    async def update(self, row: Row) -> None:
        if row.name in self.bad:
            self.calls.append(("update", row.name))
            raise PermanentError(f"{row.name} is bad")
        await super().update(row)

    async def update_batch(self, rows: list[Row]) -> None:
        self.batches.append(len(rows))
        if any(r.name in self.bad for r in rows):
            raise RuntimeError("batch refused")
        for r in rows:
            self.state[r.name] = r.value


async def test_a_burst_of_updates_goes_out_in_batches() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = BatchTarget()
    rec = Reconciler("fake", t, target, backoff=FAST, batch_size=100)
    for i in range(250):
        t.upsert(Row(f"k{i}", i))
    task = await run(rec)
    await eventually(lambda: len(target.state) == 250 and rec.settled())
    assert sorted(target.batches) == [50, 100, 100]
    assert target.calls == []
    assert all(rec.status[f"k{i}"].state is State.DONE for i in range(250))
    assert rec.applied["k7"] == Row("k7", 7)
    # one change on its own takes the one-row path; a delete always does
    t.upsert(Row("k1", 100))
    t.delete("k2")
    await eventually(lambda: target.state.get("k1") == 100 and "k2" not in target.state)
    assert sorted(target.calls) == [("delete", "k2"), ("update", "k1")]
    task.cancel()


async def test_a_failed_batch_is_applied_row_by_row_with_its_own_errors() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = BatchTarget(bad={"k3"})
    rec = Reconciler("fake", t, target, backoff=FAST, batch_size=100)
    for i in range(10):
        t.upsert(Row(f"k{i}", i))
    task = await run(rec)
    await eventually(lambda: len(target.state) == 9 and "k3" in rec.errors())
    assert rec.errors() == {"k3": "k3 is bad"}
    assert target.batches == [10]
    assert all(rec.status[f"k{i}"].state is State.DONE for i in range(10) if i != 3)
    assert len(target.calls) == 10  # every row once more, on its own
    assert {st.attempts for st in rec.status.values()} == {1}  # as if there had been no batch
    # the good rows are done; the bad one is not retried until it changes
    target.bad.clear()
    t.upsert(Row("k3", 33))
    await eventually(lambda: target.state.get("k3") == 33 and rec.settled())
    task.cancel()


# ---- time driven by hand: retry, refresh and prune without sleeping ----------------------

SLOW = Backoff(initial=10, maximum=100, factor=2, jitter=0)


async def settle() -> None:
    """Let every task that is ready run (no time passes on a ManualClock meanwhile)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def prune_waits_on(clock: ManualClock) -> None:
    await eventually(lambda: clock.next_deadline() is not None, 5, what="the prune loop waits")


async def test_a_failed_row_is_retried_when_its_backoff_has_passed() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"a": [TemporaryError("busy"), TemporaryError("still busy")]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=3600, clock=clock)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: rec.status.get("a") and rec.status["a"].state is State.ERROR)
    assert rec.summary()["objects"] == {"pending": 0, "done": 0, "error": 1}
    clock.advance(9.9)
    await settle()
    assert target.calls == [("update", "a")], "retried before its backoff passed"
    clock.advance(0.1)  # the first backoff: 10 s
    await eventually(lambda: len(target.calls) == 2, 5, what="first retry")
    await eventually(lambda: rec.status["a"].error == "still busy")
    clock.advance(19.9)  # the second backoff doubles: 20 s
    await settle()
    assert len(target.calls) == 2
    clock.advance(0.1)
    await eventually(lambda: target.state == {"a": 1}, 5, what="second retry applied the row")
    assert rec.status["a"].state is State.DONE and rec.status["a"].attempts == 3
    assert rec.settled()
    task.cancel()


async def test_a_temporary_error_delay_is_waited_out_on_the_clock() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"a": [TemporaryError("later", delay=300)]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=3600, clock=clock)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: rec.errors() == {"a": "later"})
    clock.advance(299)
    await settle()
    assert target.state == {}
    clock.advance(1)
    await eventually(lambda: target.state == {"a": 1}, 5)
    task.cancel()


async def test_refresh_reapplies_rows_changed_behind_its_back() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget()
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=60, refresh_every=2, clock=clock)
    task = await run(rec)
    t.upsert(Row("a", 1))
    t.upsert(Row("b", 2))
    await eventually(lambda: target.state == {"a": 1, "b": 2} and rec.settled())
    await prune_waits_on(clock)
    assert target.prunes == 1
    target.state["a"] = 7  # someone changed it outside the reconciler
    del target.state["b"]  # and removed another
    clock.advance(60)  # the second prune: a refresh round
    await eventually(lambda: target.state == {"a": 1, "b": 2}, 5, what="refresh repaired the drift")
    assert target.prunes == 2
    await eventually(rec.settled)
    await prune_waits_on(clock)
    target.state.clear()
    clock.advance(60)  # the third prune only prunes
    await eventually(lambda: target.prunes == 3, 5)
    await settle()
    assert target.state == {}
    clock.advance(60)  # the fourth refreshes again
    await eventually(lambda: target.state == {"a": 1, "b": 2}, 5)
    task.cancel()


async def test_prune_runs_every_interval_of_the_clock() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    done = t.register_initializer("source")
    target = FakeTarget(state={"stray": 9})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=60, refresh_every=0, clock=clock)
    task = await run(rec)
    t.upsert(Row("a", 1))
    await eventually(lambda: target.state.get("a") == 1)
    clock.advance(600)
    await settle()
    assert target.prunes == 0, "pruned before the table was initialized"
    done()
    await eventually(lambda: target.state == {"a": 1} and target.prunes == 1, 5)
    await prune_waits_on(clock)
    target.state["another"] = 1
    clock.advance(59)
    await settle()
    assert target.prunes == 1 and "another" in target.state
    clock.advance(1)
    await eventually(lambda: target.state == {"a": 1} and target.prunes == 2, 5)
    assert rec.summary()["prune_error"] == ""
    task.cancel()


@dataclass
class FailingPrune(FakeTarget):
    prune_errors: list[Exception] = field(default_factory=list)

    async def prune(self, rows: Iterable[Row]) -> None:
        if self.prune_errors:
            self.prunes += 1
            raise self.prune_errors.pop(0)
        await super().prune(rows)


async def test_a_failed_prune_is_shown_until_the_next_one_succeeds() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FailingPrune(state={"stray": 1}, prune_errors=[OSError("map busy")])
    clock = ManualClock()
    rec = Reconciler("fake", t, target, prune_interval=60, refresh_every=0, clock=clock)
    task = await run(rec)
    await asyncio.wait_for(rec.pruned_once.wait(), 5)
    assert rec.summary()["prune_error"] == "OSError: map busy" and "stray" in target.state
    await prune_waits_on(clock)
    clock.advance(60)
    await eventually(lambda: target.state == {} and rec.last_prune_error == "", 5)
    task.cancel()


async def test_a_permanent_error_is_not_retried_by_refresh_only_when_the_row_changes() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"bad": [PermanentError("refused")]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=60, refresh_every=1, clock=clock)
    task = await run(rec)
    t.upsert(Row("bad", 1))
    t.upsert(Row("good", 1))
    await eventually(lambda: rec.errors() == {"bad": "refused"} and target.state == {"good": 1})
    assert rec.status["bad"].permanent
    async def refresh_round() -> None:  # every prune is a refresh round
        await eventually(lambda: rec.status["good"].state is State.DONE)
        await prune_waits_on(clock)
        before = target.calls.count(("update", "good"))
        clock.advance(60)
        await eventually(lambda: target.calls.count(("update", "good")) > before, 5,
                         what="refresh re-applied the good row")

    for _ in range(3):
        await refresh_round()
    assert target.calls.count(("update", "bad")) == 1, "refresh retried a permanently failed row"
    assert rec.errors() == {"bad": "refused"}
    t.upsert(Row("bad", 1))  # the same row again: no change, no retry
    await settle()
    assert target.calls.count(("update", "bad")) == 1
    t.upsert(Row("bad", 2))  # a changed row is tried again
    await eventually(lambda: target.state.get("bad") == 2, 5)
    assert rec.errors() == {} and not rec.status["bad"].permanent
    task.cancel()


async def test_requeue_all_retries_a_permanently_failed_row() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"bad": [PermanentError("refused")]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=3600, clock=clock)
    task = await run(rec)
    t.upsert(Row("bad", 1))
    await eventually(lambda: rec.errors() == {"bad": "refused"})
    rec.requeue_all()  # the target restarted: it may take the row now
    await eventually(lambda: target.state == {"bad": 1}, 5)
    task.cancel()


async def test_refresh_leaves_a_row_waiting_out_its_backoff() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    target = FakeTarget(fail_update={"slow": [TemporaryError("busy", delay=100)]})
    clock = ManualClock()
    rec = Reconciler("fake", t, target, backoff=SLOW, prune_interval=60, refresh_every=1, clock=clock)
    task = await run(rec)
    t.upsert(Row("slow", 1))
    await eventually(lambda: rec.errors() == {"slow": "busy"})
    await prune_waits_on(clock)
    clock.advance(60)  # a refresh round, 40 s before the retry is due
    await eventually(lambda: target.prunes == 2, 5)
    await settle()
    assert target.calls == [("update", "slow")], "refresh cut the backoff short"
    clock.advance(40)
    await eventually(lambda: target.state == {"slow": 1}, 5)
    task.cancel()


async def test_status_times_come_from_the_clock() -> None:
    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    clock = ManualClock(start=50.0, epoch=2_000_000_000.0)
    rec = Reconciler("fake", t, FakeTarget(), prune_interval=3600, clock=clock)
    task = await run(rec)
    clock.advance(5)
    t.upsert(Row("a", 1))
    await eventually(lambda: rec.settled() and "a" in rec.applied)
    assert rec.status["a"].updated == 2_000_000_005.0
    task.cancel()


async def test_a_row_applied_while_a_prune_runs_is_applied_again_after_it() -> None:
    """A prune that read the rows before a new row was applied sees that row on the target as
    a stray and removes it; the reconciler applies such rows again once the prune is over."""
    read_target = asyncio.Event()
    pruning = asyncio.Event()

    class SlowPrune(FakeTarget):
        async def prune(self, rows: Iterable[Row]) -> None:
            keep = {r.name for r in rows}
            pruning.set()
            await read_target.wait()  # listing the target takes a while
            for k in list(self.state):
                if k not in keep:
                    del self.state[k]
            self.prunes += 1

    t: Table[str, Row] = Table("rows", key=lambda r: r.name)
    t.upsert(Row("a", 1))
    target = SlowPrune()
    rec = Reconciler("fake", t, target, backoff=FAST)
    task = await run(rec)
    await eventually(lambda: target.state == {"a": 1})
    await eventually(pruning.is_set)
    t.upsert(Row("b", 2))
    await eventually(lambda: target.state == {"a": 1, "b": 2})
    read_target.set()  # the prune removes "b", which it did not know of
    await eventually(lambda: target.prunes == 1)
    await eventually(lambda: target.state == {"a": 1, "b": 2}, what=lambda: str(target.state))
    assert target.calls.count(("update", "b")) == 2
    task.cancel()

"""The hive's reconcilers: started with their module, stopped with it, reported alike."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from plexus.commands.agent import _render_status
from plexus.core.config import Strict
from plexus.core.module import App, Hive, Module
from plexus.core.reconciler import PermanentError, Reconciler
from plexus.core.tables import Table
from tests.support import eventually
from tests.unit.test_reconciler import FakeTarget, Row


class NoConfig(Strict):
    pass


class Eager:
    """Registers its reconciler at build."""

    def __init__(self, hive: Hive) -> None:
        self.table: Table[str, Row] = Table("eager-rows", key=lambda r: r.name)
        self.target = FakeTarget()
        self.rec = hive.reconcile("eager", "eager-rows", self.table, self.target, prune_interval=3600)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"rows": len(self.table)}


class Lazy:
    """Registers one reconciler in start and another once its target is ready, later."""

    def __init__(self, hive: Hive) -> None:
        self.hive = hive
        self.table: Table[str, Row] = Table("lazy-rows", key=lambda r: r.name)
        self.later: Table[str, Row] = Table("later-rows", key=lambda r: r.name)
        self.target = FakeTarget(fail_update={"bad": [PermanentError("refused")]})
        self.later_target = FakeTarget()
        self.ready = asyncio.Event()
        self.recs: list[Reconciler[str, Row]] = []

    async def start(self) -> None:
        self.recs.append(self.hive.reconcile("lazy", "lazy-rows", self.table, self.target))
        self.hive.spawn("lazy", self._when_ready(), "when-ready")

    async def _when_ready(self) -> None:
        await self.ready.wait()
        self.recs.append(self.hive.reconcile("lazy", "later-rows", self.later, self.later_target))

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}


class Plain:
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"enabled": True}


def app(tmp_path: Path) -> App:
    modules: list[Module[Any]] = [
        Module("eager", "", NoConfig, lambda hive, _c: Eager(hive)),
        Module("lazy", "", NoConfig, lambda hive, _c: Lazy(hive)),
        Module("plain", "", NoConfig, lambda _hive, _c: Plain()),
    ]
    return App(Hive(agent=None, state_dir=tmp_path), modules, {m.name: NoConfig() for m in modules})


async def test_a_reconciler_registered_at_build_runs_from_its_module_start_until_stop(tmp_path: Path) -> None:
    a = app(tmp_path)
    eager = a.components["eager"]
    assert isinstance(eager, Eager)
    eager.table.upsert(Row("x", 1))
    await asyncio.sleep(0)
    assert eager.target.state == {} and not a.status()["eager"]["reconcilers"]["eager-rows"]["running"]
    await a.start()
    await eventually(lambda: eager.target.state == {"x": 1})
    st = a.status()["eager"]
    assert st["rows"] == 1 and st["reconcilers"]["eager-rows"]["running"]
    assert st["reconcilers"]["eager-rows"]["objects"] == {"pending": 0, "done": 1, "error": 0}
    await a.stop()
    assert not a.status()["eager"]["reconcilers"]["eager-rows"]["running"]
    assert eager.target.state == {"x": 1}, "stop is not remove"
    eager.table.upsert(Row("y", 2))
    await asyncio.sleep(0)
    assert eager.target.state == {"x": 1}, "a stopped reconciler applied a row"


async def test_reconcilers_registered_during_and_after_start_run_at_once(tmp_path: Path) -> None:
    a = app(tmp_path)
    lazy = a.components["lazy"]
    assert isinstance(lazy, Lazy)
    await a.start()
    try:
        lazy.table.upsert(Row("x", 1))
        await eventually(lambda: lazy.target.state == {"x": 1})
        lazy.later.upsert(Row("z", 3))
        lazy.ready.set()  # the target becomes ready after start
        await eventually(lambda: lazy.later_target.state == {"z": 3})
        assert set(a.status()["lazy"]["reconcilers"]) == {"lazy-rows", "later-rows"}
        assert all(r.metrics is a.hive.metrics.reconciler for r in lazy.recs)
    finally:
        await a.stop()


async def test_every_module_reports_its_reconcilers_and_errors_degrade_it(tmp_path: Path) -> None:
    a = app(tmp_path)
    lazy = a.components["lazy"]
    assert isinstance(lazy, Lazy)
    await a.start()
    try:
        assert a.status()["plain"]["reconcilers"] == {}
        assert a.health() == {"ok": True, "status": "ok", "health": {"eager": "ok", "lazy": "ok",
                                                                     "plain": "ok"}, "degraded": {}}
        lazy.table.upsert(Row("good", 1))
        lazy.table.upsert(Row("bad", 1))
        await eventually(lambda: lazy.recs[0].errors() == {"bad": "refused"} and "good" in lazy.target.state)
        st = a.status()["lazy"]
        rec = st["reconcilers"]["lazy-rows"]
        assert rec["objects"] == {"pending": 0, "done": 1, "error": 1}
        assert rec["last_error"] == "bad: refused" and rec["errors"] == {"bad": "refused"}
        assert rec["prune_error"] == ""
        assert st["health"] == "ok" and "lazy-rows: 1 object(s) in error, last bad: refused" in st["degraded"]
        assert "degraded" not in a.status()["eager"]
        health = a.health()
        assert health["ok"] and health["status"] == "degraded" and set(health["degraded"]) == {"lazy"}

        metrics = generate_latest(a.hive.metrics.registry).decode()
        assert 'plexus_reconcile_objects{state="error",target="lazy-rows"} 1.0' in metrics
        assert 'plexus_reconcile_objects{state="done",target="lazy-rows"} 1.0' in metrics
        assert 'plexus_reconcile_total{op="update",outcome="error",target="lazy-rows"} 1.0' in metrics
        assert 'plexus_reconcile_duration_seconds_count{op="prune",target="lazy-rows"}' in metrics

        async def crash() -> None:
            raise RuntimeError("boom")

        await asyncio.gather(a.hive.spawn("plain", crash(), "crash"), return_exceptions=True)
        await asyncio.sleep(0)
        health = a.health()
        assert not health["ok"] and health["status"] == "unhealthy"
    finally:
        await a.stop()


async def test_a_reconciler_of_the_same_name_replaces_the_earlier_one(tmp_path: Path) -> None:
    hive = Hive(agent=None, state_dir=tmp_path)
    table: Table[str, Row] = Table("rows", key=lambda r: r.name)
    first = hive.reconcile("m", "rows", table, FakeTarget())
    second_target = FakeTarget()
    second = hive.reconcile("m", "rows", table, second_target)
    assert hive.reconcilers("m") == {"rows": second} and first is not second
    table.upsert(Row("a", 1))
    await eventually(lambda: second_target.state == {"a": 1})
    assert first.applied == {}
    await hive.stop_module("m")


def test_plexus_status_prints_each_reconciler() -> None:
    out = _render_status({"cluster": "east", "clusterID": 1, "node": "n1", "pid": 7, "modules": {
        "bpf": {"health": "ok", "loaded": True, "degraded": "bpf-ipcache: 1 object(s) in error",
                "reconcilers": {"bpf-ipcache": {"objects": {"pending": 2, "done": 5, "error": 1},
                                                "last_error": "10.0.0.1/32: map full",
                                                "prune_error": "", "running": True}}},
        "plain": {"health": "ok", "reconcilers": {}}}})
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["bpf", "degraded"] and "reconcilers" not in lines[1]
    assert lines[2].split()[:7] == ["bpf-ipcache", "pending", "2", "done", "5", "error", "1"]
    assert lines[2].endswith("last error: 10.0.0.1/32: map full")
    assert lines[3].split()[:2] == ["plain", "ok"]

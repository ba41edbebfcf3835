"""Module objects and the hive that composes them.

A package says in one place (its `module.py`) its name, its config section with
defaults, and how to build its component. Building registers tables and API routes and
must do no I/O; `start` begins work; `stop` ends it and leaves kernel and BGP state in
place (stop is not remove).

Reconcilers belong to the hive: a module asks `hive.reconcile(module, name, table, ops)`
and gets one that runs under the module's supervised tasks while the module runs (from its
start, or at once when asked during or after start, e.g. once a device exists), is
cancelled when it stops, and is reported the same way for every module: objects pending,
done and in error, the last error and the last prune error, in `App.status()` and
`App.health()`.

Health: a crashed task or a module that could not start makes the agent unhealthy (`ok`
false: a restart may help). An object in error, or a failed prune, only makes its module
"degraded": the agent works, a row the target refuses is no reason to restart it, and a
temporary error clears itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from plexus.core.api import Routes
from plexus.core.clock import Clock, SystemClock
from plexus.core.config import Strict
from plexus.core.metrics import Metrics
from plexus.core.reconciler import Ops, Reconciler, State
from plexus.core.tables import Table

T = TypeVar("T")
C = TypeVar("C", bound=Strict)
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Module(Generic[C]):
    name: str
    doc: str
    config: type[C]
    build: Callable[[Hive, C], Component]


@dataclass(frozen=True)
class Key(Generic[T]):
    """A typed name for something one module provides and others require."""

    name: str


@dataclass
class Hive:
    """What every module's build receives: shared config, registry, routes, tasks."""

    agent: Any  # the agent's common config (plexus.agent.AgentConfig)
    state_dir: Path
    metrics: Metrics = field(default_factory=Metrics)
    routes: Routes = field(default_factory=Routes)
    _provided: dict[str, Any] = field(default_factory=dict)
    _tasks: dict[str, set[asyncio.Task[Any]]] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)
    clock: Clock = field(default_factory=SystemClock)
    _reconcilers: dict[str, dict[str, Reconciler[Any, Any]]] = field(default_factory=dict)
    _running: dict[tuple[str, str], asyncio.Task[Any]] = field(default_factory=dict)
    _waiting: set[str] = field(default_factory=set)  # modules built and not started

    def provide(self, key: Key[T], value: T) -> T:
        if key.name in self._provided:
            raise RuntimeError(f"{key.name} is provided twice")
        self._provided[key.name] = value
        return value

    def require(self, key: Key[T]) -> T:
        try:
            return self._provided[key.name]  # type: ignore[no-any-return]
        except KeyError:
            raise RuntimeError(f"{key.name} is required but no module provides it") from None

    def optional(self, key: Key[T]) -> T | None:
        return self._provided.get(key.name)

    def spawn(self, owner: str, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run `coro` under `owner`'s supervision: a crash is logged and marks health."""
        label = name or getattr(coro, "__qualname__", "task")
        task = asyncio.create_task(coro, name=f"{owner}:{label}")
        self._tasks.setdefault(owner, set()).add(task)
        self.health.setdefault(owner, "ok")

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.get(owner, set()).discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                self.health[owner] = f"task {t.get_name()} failed: {type(exc).__name__}: {exc}"
                log.error("module=%s task=%s crashed", owner, t.get_name(), exc_info=exc)

        task.add_done_callback(done)
        return task

    async def cancel_tasks(self, owner: str) -> None:
        tasks = list(self._tasks.pop(owner, set()))
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- reconcilers ----------------------------------------------------------------
    def reconcile(self, owner: str, name: str, table: Table[K, R], ops: Ops[R],
                  **options: Any) -> Reconciler[K, R]:
        """A reconciler of `table` into `ops`, registered under module `owner`, with the
        shared metrics and the hive's clock; `options` are the Reconciler's (backoff,
        prune_interval, concurrency, ...). It runs while its module runs: at once when the
        module has started (or nobody said it had not: a module started on its own), else
        when it starts. One of the same name replaces the earlier one."""
        rec: Reconciler[K, R] = Reconciler(name, table, ops, metrics=self.metrics.reconciler,
                                           clock=self.clock, **options)
        old = self._running.pop((owner, name), None)
        if old is not None:
            old.cancel()
        self._reconcilers.setdefault(owner, {})[name] = rec
        self.health.setdefault(owner, "ok")
        if owner not in self._waiting:
            self._run(owner, rec)
        return rec

    def reconcilers(self, owner: str) -> dict[str, Reconciler[Any, Any]]:
        return dict(self._reconcilers.get(owner, {}))

    def module_built(self, owner: str) -> None:
        """`owner` is built and not started: its reconcilers wait for `start_module`."""
        self._waiting.add(owner)

    def start_module(self, owner: str) -> None:
        """`owner` starts: its reconcilers run, and those it registers from now on run at once."""
        self._waiting.discard(owner)
        for rec in self._reconcilers.get(owner, {}).values():
            self._run(owner, rec)

    async def stop_module(self, owner: str) -> None:
        """`owner` stops: its tasks and reconcilers end; the target keeps what they applied."""
        self._waiting.add(owner)
        await self.cancel_tasks(owner)

    def _run(self, owner: str, rec: Reconciler[Any, Any]) -> None:
        key = (owner, rec.name)
        if key in self._running:
            return
        task = self.spawn(owner, rec.run(), rec.name)
        self._running[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self._running.get(key) is t:
                del self._running[key]

        task.add_done_callback(done)

    def reconciler_status(self, owner: str) -> dict[str, dict[str, Any]]:
        """Each reconciler of `owner`: objects by state, errors, last error, prune error."""
        return {name: {**rec.summary(), "running": (owner, name) in self._running}
                for name, rec in self._reconcilers.get(owner, {}).items()}

    def degraded(self) -> dict[str, str]:
        """Modules with an object in error or a failed prune, and why."""
        out: dict[str, str] = {}
        for owner, recs in self._reconcilers.items():
            why = []
            for name, rec in recs.items():
                failed = rec.counts()[State.ERROR.value]
                if failed:
                    why.append(f"{name}: {failed} object(s) in error, last {rec.last_error()}")
                if rec.last_prune_error:
                    why.append(f"{name}: prune failed: {rec.last_prune_error}")
            if why:
                out[owner] = "; ".join(why)
        return out


class App:
    """Builds modules in order, starts them in order, stops them in reverse."""

    def __init__(self, hive: Hive, modules: list[Module[Any]], configs: dict[str, Strict]) -> None:
        self.hive = hive
        self.modules = modules
        self.components: dict[str, Component] = {}
        for m in modules:
            hive.module_built(m.name)
            self.components[m.name] = m.build(hive, configs[m.name])

    async def start(self) -> None:
        for name, comp in self.components.items():
            log.info("starting module=%s", name)
            self.hive.start_module(name)
            await comp.start()
            self.hive.health.setdefault(name, "ok")

    async def stop(self) -> None:
        for name, comp in reversed(self.components.items()):
            log.info("stopping module=%s", name)
            try:
                await comp.stop()
            except Exception:
                log.exception("module=%s failed to stop cleanly", name)
            await self.hive.stop_module(name)

    def status(self) -> dict[str, Any]:
        """Per module: its health, what it reports, and its reconcilers (`reconcilers`,
        the same shape for every module; `degraded` says why when one has errors)."""
        out: dict[str, Any] = {}
        degraded = self.hive.degraded()
        for name, comp in self.components.items():
            try:
                out[name] = {"health": self.hive.health.get(name, "ok"), **comp.status()}
            except Exception as e:
                out[name] = {"health": f"status failed: {e}"}
            out[name]["reconcilers"] = self.hive.reconciler_status(name)
            if name in degraded:
                out[name]["degraded"] = degraded[name]
        return out

    def health(self) -> dict[str, Any]:
        """`ok` false only when a module is unhealthy (a crashed task, a failed start);
        `status` is "ok", "degraded" (objects in error, see `degraded`) or "unhealthy"."""
        health = dict(self.hive.health)
        degraded = self.hive.degraded()
        ok = all(h == "ok" for h in health.values())
        return {"ok": ok, "status": "unhealthy" if not ok else "degraded" if degraded else "ok",
                "health": health, "degraded": degraded}

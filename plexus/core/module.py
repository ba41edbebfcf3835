"""Module objects and the hive that composes them.

A package says in one place (its `module.py`) its name, its config section with
defaults, and how to build its component. Building registers tables and API routes and
must do no I/O; `start` begins work; `stop` ends it and leaves kernel and BGP state in
place (stop is not remove).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from plexus.core.api import Routes
from plexus.core.config import Strict
from plexus.core.metrics import Metrics

T = TypeVar("T")
C = TypeVar("C", bound=Strict)

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


class App:
    """Builds modules in order, starts them in order, stops them in reverse."""

    def __init__(self, hive: Hive, modules: list[Module[Any]], configs: dict[str, Strict]) -> None:
        self.hive = hive
        self.modules = modules
        self.components: dict[str, Component] = {}
        for m in modules:
            self.components[m.name] = m.build(hive, configs[m.name])

    async def start(self) -> None:
        for name, comp in self.components.items():
            log.info("starting module=%s", name)
            await comp.start()
            self.hive.health.setdefault(name, "ok")

    async def stop(self) -> None:
        for name, comp in reversed(self.components.items()):
            log.info("stopping module=%s", name)
            try:
                await comp.stop()
            except Exception:
                log.exception("module=%s failed to stop cleanly", name)
            await self.hive.cancel_tasks(name)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, comp in self.components.items():
            try:
                out[name] = {"health": self.hive.health.get(name, "ok"), **comp.status()}
            except Exception as e:
                out[name] = {"health": f"status failed: {e}"}
        return out

"""Time as something a component is given: the real clock, or one a test moves by hand.

Code that schedules (retries, backoff, periodic work) reads `now()` and waits with
`wait_until(deadline, event)` instead of calling `time` and `asyncio.sleep` itself, so a
test can advance the clock past a backoff and see the retry without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds: for deadlines and durations."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch: for timestamps shown to people."""

    async def wait_until(self, deadline: float | None, event: asyncio.Event) -> bool:
        """Wait until `event` is set (True) or `now()` reaches `deadline` (False); a
        `deadline` of None waits for the event alone."""


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def wait_until(self, deadline: float | None, event: asyncio.Event) -> bool:
        timeout = None if deadline is None else max(0.0, deadline - self.now())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return event.is_set()


class ManualClock:
    """A clock that stands still until `advance` moves it; waiters whose deadline it
    passes wake up."""

    def __init__(self, start: float = 1000.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch = epoch - start
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._epoch

    @property
    def waiters(self) -> int:
        """How many waits have a deadline still ahead: a test waits for this before
        advancing, so the wake-up it means to cause has been scheduled."""
        return sum(1 for _, f in self._timers if not f.done())

    def next_deadline(self) -> float | None:
        pending = [d for d, f in self._timers if not f.done()]
        return min(pending) if pending else None

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [(d, f) for d, f in self._timers if d <= self._now]
        self._timers = [(d, f) for d, f in self._timers if d > self._now]
        for _, f in due:
            if not f.done():
                f.set_result(None)

    async def wait_until(self, deadline: float | None, event: asyncio.Event) -> bool:
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        if deadline <= self._now:
            return False
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timers.append((deadline, timer))
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((woken, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()
            self._timers = [(d, f) for d, f in self._timers if f is not timer]
        return event.is_set()

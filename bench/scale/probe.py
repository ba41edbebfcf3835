"""A program (the agent, KVStoreMesh) run under a probe, for `bench.scale.bench --probe`.

    python -m bench.scale.probe OUT_DIR [--profile] -- agent --config ...

SIGUSR1 opens a window, SIGUSR2 closes it and writes OUT_DIR/probe.json: how late the
event loop ran a 5 ms timer (its stalls), and how long each garbage collection took, by
generation; with `--profile`, also OUT_DIR/profile.pstats, cProfile of the event loop's
thread over the window.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import percentile

TICK = 0.005


class Probe:
    def __init__(self, out: Path, profile: bool) -> None:
        self.out = out
        self.profiler = cProfile.Profile() if profile else None
        self.open = False
        self.lags: list[float] = []
        self.gc: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_start = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.open:
            self.gc[int(info["generation"])].append((time.perf_counter() - self._gc_start) * 1000)

    async def ticks(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK)
            if self.open:
                self.lags.append((time.perf_counter() - t0 - TICK) * 1000)

    def start(self, *_: Any) -> None:
        self.lags.clear()
        for v in self.gc.values():
            v.clear()
        self.open = True
        self.t0 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()

    def stop(self, *_: Any) -> None:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(str(self.out / "profile.pstats"))
        self.open = False
        lags = sorted(self.lags)
        report = {
            "seconds": time.perf_counter() - self.t0,
            "loop_lag_ms": {"n": len(lags), "p50": percentile(lags, 50), "p99": percentile(lags, 99),
                            "max": max(lags, default=0.0), "over_20ms": sum(x > 20 for x in lags),
                            "total_over_20ms": sum(x for x in lags if x > 20)},
            "gc_ms": {str(g): {"n": len(v), "total": sum(v), "max": max(v, default=0.0)}
                      for g, v in self.gc.items()},
        }
        (self.out / "probe.json").write_text(json.dumps(report))


def main() -> None:
    out = Path(sys.argv[1])
    rest = sys.argv[2:]
    profile = rest[:1] == ["--profile"]
    rest = rest[1:] if profile else rest
    if rest[:1] == ["--"]:
        rest = rest[1:]
    probe = Probe(out, profile)
    gc.callbacks.append(probe.on_gc)
    signal.signal(signal.SIGUSR1, probe.start)
    signal.signal(signal.SIGUSR2, probe.stop)

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = super().new_event_loop()
            loop.call_soon(lambda: setattr(probe, "task", loop.create_task(probe.ticks())))
            return loop
    asyncio.set_event_loop_policy(Policy())
    from plexus.cli import main as plexus_main
    sys.exit(plexus_main(rest))


if __name__ == "__main__":
    main()

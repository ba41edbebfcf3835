"""Wall time of `plexus lab up` (cold and warm), `lab down`, and one pod through the CNI plugin.

    .venv/bin/python -m bench.lab.bench [--runs 3]

Each run is a real `plexus` process, as a user types it; the lab must be down to start.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parents[2]


def timed(*args: str) -> float:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"plexus {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if Path("/var/run/netns/plx-router").exists():
        raise SystemExit("a lab is up: `plexus lab down` first")
    figures: dict[str, list[float]] = {"lab up (cold)": [], "lab up (again, all running)": [],
                                       "lab pod add": [], "lab down": []}
    for _ in range(max(1, min(args.runs, 10))):
        figures["lab up (cold)"].append(timed("lab", "up"))
        figures["lab up (again, all running)"].append(timed("lab", "up"))
        figures["lab pod add"].append(timed("lab", "pod", "add", "east", "n1", "bench"))
        figures["lab down"].append(timed("lab", "down"))
    print(f"machine: {machine()}")
    print(f"{'step':<30} {'median':>8} {'min':>8} {'max':>8}")
    for step, values in figures.items():
        print(f"{step:<30} {statistics.median(values):>7.2f}s {min(values):>7.2f}s {max(values):>7.2f}s")
    print(f"rerun: .venv/bin/python -m bench.lab.bench --runs {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

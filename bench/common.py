"""Shared pieces of the benchmarks: percentiles and the machine line."""

from __future__ import annotations

import os
import platform
import subprocess


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def machine() -> str:
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"{os.cpu_count()} vCPU, kernel {platform.release()}, Python {platform.python_version()}, "
            f"{etcd.strip()}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

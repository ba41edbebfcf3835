"""A run killed before its cleanup leaves namespaces (and what runs in them): the next run,
holding the machine lock, removes them."""

from __future__ import annotations

import subprocess
import time

from tests.support import NETNS_RECORDS, add_netns, del_netns, sweep_stale_netns, unique


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_dead_runs_namespaces_and_their_processes_are_swept(root: None) -> None:
    gone_run = subprocess.Popen(["true"])
    gone_run.wait()
    stale, live = unique("plx-tk"), unique("plx-tk")
    add_netns(stale)
    add_netns(live)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        (NETNS_RECORDS / stale).write_text(f"{gone_run.pid}\n")  # as a killed run leaves it
        deadline = time.monotonic() + 5
        while not subprocess.run(["ip", "netns", "pids", stale], capture_output=True,
                                 text=True).stdout.strip():
            assert time.monotonic() < deadline, "sleep never ran in the namespace"
            time.sleep(0.02)

        assert stale in sweep_stale_netns()
        assert stale not in _namespaces() and not (NETNS_RECORDS / stale).exists()
        assert sleeper.wait(5) != 0  # stopped, not left running in a namespace nobody names
        # this run's own namespace stays
        assert live in _namespaces() and (NETNS_RECORDS / live).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        del_netns(stale)
        del_netns(live)

"""The lab's process helpers against real processes in a namespace: only ours get stopped."""

from __future__ import annotations

from pathlib import Path

from plexus.lab import ops
from tests.support import netns, wait_until


def test_spawn_records_the_daemon_and_stop_all_takes_its_children(tmp_path: Path, root: None) -> None:
    marker = str(tmp_path)
    with netns("plx-tl") as ns:
        # A daemon that starts a child of its own, as an agent starts wireguard-go.
        pid = ops.spawn(ns, ["sh", "-c", f"sleep 300 & echo {marker} >/dev/null; wait"],
                        tmp_path / "d.log")
        assert ops.alive(pid, marker)
        assert "sh -c" in ops.cmdline(pid)  # ip netns exec exec'd: the PID is the daemon's
        kids = wait_until(lambda: ops.descendants([pid]), 5, what="the daemon's child")
        (child, started), = kids
        assert "sleep 300" in ops.cmdline(child)

        assert not ops.alive(pid, "/not/ours")  # a PID whose args lack the marker is not ours
        ops.stop(pid, "/not/ours")  # ... and is left alone
        assert ops.running(pid)

        ops.stop_all([(pid, lambda: ops.alive(pid, marker))], timeout=5)
        assert not ops.alive(pid, marker)
        assert ops.running(child)  # orphaned, still running: down stops it by (pid, start time)
        ops.stop_all([(child, lambda: ops.running(child) and ops.start_time(child) == started)],
                     timeout=5)
        assert not (ops.running(child) and ops.start_time(child) == started)


def test_stop_all_kills_what_ignores_sigterm(tmp_path: Path, root: None) -> None:
    marker = str(tmp_path)
    with netns("plx-tl") as ns:
        pid = ops.spawn(ns, ["sh", "-c", f"trap '' TERM; echo {marker} >/dev/null; "
                                         "while :; do sleep 0.1; done"], tmp_path / "d.log")
        ops.stop_all([(pid, lambda: ops.alive(pid, marker))], timeout=0.5)
        assert not ops.alive(pid, marker)

"""What the lab does to the machine: namespaces, links, processes. Only inside namespaces."""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


class LabError(RuntimeError):
    pass


def run(*cmd: str, ns: str | None = None, check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(full)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def namespaces() -> set[str]:
    out = run("ip", "netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ensure_netns(name: str) -> bool:
    if name in namespaces():
        return False
    run("ip", "netns", "add", name)
    run("ip", "link", "set", "lo", "up", ns=name)
    return True


def delete_netns(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


def link_exists(ns: str, name: str) -> bool:
    return run("ip", "-n", ns, "link", "show", name, check=False).returncode == 0


def sysctl(ns: str, key: str, value: str) -> None:
    run("sysctl", "-q", "-w", f"{key}={value}", ns=ns)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def spawn(ns: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a daemon inside `ns`, detached from this process; return its PID."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=f, stderr=f, start_new_session=True,
                                env={**os.environ, **(env or {})})
    # Until the child has exec'd, its cmdline is empty and it cannot be told apart.
    wait_for(lambda: bool(cmdline(proc.pid)) or proc.poll() is not None, 5, f"{argv[0]} to start",
             interval=0.01)
    # The daemon outlives this handle by design; keep it so it is reaped, not warned about.
    _CHILDREN[proc.pid] = proc
    return proc.pid


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _reap_exited() -> None:
    """Collect the daemons we started that another process stopped (`plexus lab down` run
    apart from us): otherwise they stay zombies until we exit and their handles complain."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields after the command name: [state, ppid, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_time(pid: int) -> int:
    """Start time in clock ticks since boot: a PID plus this names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if len(fields) > 19 else 0


def running(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def still_running(pid: int, started: int) -> bool:
    """True while `pid` runs and is the process that started at `started` (see start_time)."""
    return running(pid) and start_time(pid) == started


PF_KTHREAD = 0x00200000


def alive(pid: int, marker: str) -> bool:
    """True when `pid` runs and is still the process we started (its args hold `marker`)."""
    fields = _stat(pid)
    if not fields or fields[0] == "Z" or int(fields[6]) & PF_KTHREAD:
        return False
    args = cmdline(pid)
    # Empty while the process is between fork and exec, or inside execve.
    return not args or marker in args


def descendants(pids: Iterable[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every process below `pids`, e.g. the wireguard-go an agent runs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[tuple[int, int]] = []
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, start_time(child)))
            todo.append(child)
    return out


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status when `pid` is our child, so it is not left a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_all(procs: Sequence[tuple[int, Callable[[], bool]]], timeout: float = 10) -> None:
    """SIGTERM each (pid, still-ours) together, SIGKILL what is left after `timeout`.

    `still-ours` is checked before every signal, so a PID reused by someone else is never hit.
    """
    live = [(pid, ours) for pid, ours in procs if ours()]
    for pid, _ in live:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for sig_deadline, sig in ((deadline, signal.SIGKILL), (deadline + 5, None)):
        while True:
            for pid, _ in live:
                _reap(pid)
            live = [(pid, ours) for pid, ours in live if ours()]
            if not live or time.monotonic() > sig_deadline:
                break
            time.sleep(0.02)
        if not live:
            return
        if sig is None:
            raise LabError(f"processes did not exit after SIGKILL: {[pid for pid, _ in live]}")
        for pid, _ in live:
            _signal(pid, sig)


def stop(pid: int, marker: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL; only if the PID is still ours."""
    stop_all([(pid, lambda: alive(pid, marker))], timeout)


MACHINE_LOCK = os.environ.get("PLEXUS_MACHINE_LOCK", "/run/plexus-tests.lock")
LOCK_HELD_ENV = "PLEXUS_MACHINE_LOCK_HELD"  # inherited by children: they run under our lock
_held: list[int] = []


def hold_machine_lock() -> None:
    """The lab, the test namespaces and the pinned maps are one per machine: a second run
    waits here instead of tearing down the first's. Held until this process exits."""
    if _held or os.environ.get(LOCK_HELD_ENV):  # held here or by the process that spawned us
        return
    for inherited in _fds_open_on(MACHINE_LOCK):  # `flock LOCK cmd` or a parent run holds it
        try:
            fcntl.flock(inherited, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        _held.append(inherited)
        os.environ[LOCK_HELD_ENV] = str(os.getpid())
        return
    fd = os.open(MACHINE_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"\nwaiting for {MACHINE_LOCK}: another test run or benchmark uses the machine")
        fcntl.flock(fd, fcntl.LOCK_EX)
    _held.append(fd)
    os.environ[LOCK_HELD_ENV] = str(os.getpid())


def _fds_open_on(path: str) -> list[int]:
    fds = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry) == path:
                fds.append(int(entry.name))
        except OSError:
            continue
    return fds

"""What the lab does to the machine: namespaces, links, processes. Only inside namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
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
    return proc.pid


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int, marker: str) -> bool:
    """True when `pid` runs and is still the process we started (its args hold `marker`)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        return False
    args = cmdline(pid)
    # Empty while the process is between fork and exec, or inside execve.
    return not args or marker in args


def stop(pid: int, marker: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL; only if the PID is still ours."""
    if not alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid, marker):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            break
        time.sleep(0.05)
    try:  # reap it when it is our child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

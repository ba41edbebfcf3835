"""The faults a soak injects into a running lab, one a minute, drawn from a fixed list with a
seeded random generator so a run can be repeated.

Each fault names what it hit; the lab's own `plexus lab up` brings back the daemons it
killed (it starts what is missing and leaves what runs alone). Agents are killed only on the
n2 nodes, so the n1 agents run the whole soak and their memory growth is measured on one
process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import Node

ROOT = Path(__file__).resolve().parents[2]
OUTAGE = 5.0  # seconds a killed daemon stays dead before `plexus lab up` restarts it


@dataclass(frozen=True)
class Injected:
    kind: str
    target: str
    detail: str


@dataclass(frozen=True)
class Fault:
    kind: str
    summary: str
    inject: Callable[[Lab, random.Random, Callable[[], str]], Injected]


def lab_up() -> str:
    """`plexus lab up` as a user types it; its output's last line, or why it failed."""
    r = subprocess.run([sys.executable, "-m", "plexus", "lab", "up"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        return f"lab up failed: {(r.stderr or r.stdout).strip()[-400:]}"
    started = [line.split(":")[0].strip() for line in r.stdout.splitlines() if ": started" in line]
    return "lab up started " + (", ".join(started) or "nothing")


def _process(lab: Lab, name: str) -> ops.LabError | tuple[int, str]:
    proc = State.load(lab.state_path).processes.get(name)
    if proc is None or not ops.alive(proc.pid, proc.marker):
        return ops.LabError(f"{name} is not running")
    return proc.pid, proc.marker


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_daemon(lab: Lab, name: str, restart: Callable[[], str]) -> str:
    """kill -9 the lab daemon `name` (by the PID the lab recorded), leave it dead for a
    moment, then restart it the way a user would."""
    found = _process(lab, name)
    if isinstance(found, ops.LabError):
        return f"{found}; {_restart(restart)}"
    pid, marker = found
    _kill(pid)
    ops.wait_for(lambda: not ops.alive(pid, marker), 10, f"{name} to die")
    time.sleep(OUTAGE)
    return f"pid {pid} killed; {_restart(restart)}"


def _restart(restart: Callable[[], str]) -> str:
    t0 = time.monotonic()
    said = restart()
    return f"{said} ({time.monotonic() - t0:.1f}s)"


def _n2(lab: Lab, rng: random.Random) -> Node:
    return rng.choice([n for n in lab.topo.nodes() if n.name == "n2"])


def agent_kill(lab: Lab, rng: random.Random, restart: Callable[[], str]) -> Injected:
    n = _n2(lab, rng)
    return Injected("agent-kill", n.key, _kill_daemon(lab, f"agent-{n.key}", restart))


def etcd_kill(lab: Lab, rng: random.Random, restart: Callable[[], str]) -> Injected:
    c = rng.choice(lab.topo.clusters)
    return Injected("etcd-kill", c.name, _kill_daemon(lab, f"etcd-{c.name}", restart))


def apiserver_kill(lab: Lab, rng: random.Random, restart: Callable[[], str]) -> Injected:
    c = rng.choice(lab.topo.clusters)
    return Injected("apiserver-kill", c.name, _kill_daemon(lab, f"apiserver-{c.name}", restart))


def etcd_freeze(lab: Lab, rng: random.Random, _restart: Callable[[], str]) -> Injected:
    """SIGSTOP for 15 s: etcd is there but answers nothing, as behind a partition."""
    c = rng.choice(lab.topo.clusters)
    found = _process(lab, f"etcd-{c.name}")
    if isinstance(found, ops.LabError):
        return Injected("etcd-freeze", c.name, str(found))
    pid, _ = found
    _kill(pid, signal.SIGSTOP)
    try:
        time.sleep(15)
    finally:
        _kill(pid, signal.SIGCONT)
    return Injected("etcd-freeze", c.name, f"pid {pid} stopped for 15s")


def exabgp_kill(lab: Lab, rng: random.Random, _restart: Callable[[], str]) -> Injected:
    """kill -9 a node's ExaBGP; its agent restarts the speaker by itself."""
    n = rng.choice(lab.topo.nodes())
    found = _process(lab, f"agent-{n.key}")
    if isinstance(found, ops.LabError):
        return Injected("exabgp-kill", n.key, str(found))
    speakers = [pid for pid, _ in ops.descendants([found[0]]) if "exabgp" in ops.cmdline(pid).lower()
                or "bgp/launcher.py" in ops.cmdline(pid)]
    for pid in speakers:
        _kill(pid)
    return Injected("exabgp-kill", n.key, f"killed {speakers or 'nothing (no speaker found)'}")


def wireguard_kill(lab: Lab, rng: random.Random, _restart: Callable[[], str]) -> Injected:
    """kill -9 a node's wireguard-go (the PID its agent wrote down)."""
    n = _n2(lab, rng)
    pid_file = lab.node_dir(n) / "state" / "wireguard-go.pid"
    pid = int(pid_file.read_text().strip() or 0) if pid_file.exists() else 0
    if not pid or not ops.alive(pid, n.wg_device):
        return Injected("wireguard-kill", n.key, "wireguard-go not running")
    _kill(pid)
    return Injected("wireguard-kill", n.key, f"pid {pid} killed")


def bird_reconfigure(lab: Lab, _rng: random.Random, _restart: Callable[[], str]) -> Injected:
    out = lab.birdc("configure").strip().splitlines()
    return Injected("bird-reconfigure", "router", out[-1] if out else "no answer")


def bgp_session_reset(lab: Lab, rng: random.Random, _restart: Callable[[], str]) -> Injected:
    n = rng.choice(lab.topo.nodes())
    out = lab.birdc("restart", lab.bgp_protocol(n)).strip().splitlines()
    return Injected("bgp-session-reset", n.key, out[-1] if out else "no answer")


def bird_kill(lab: Lab, _rng: random.Random, restart: Callable[[], str]) -> Injected:
    return Injected("bird-kill", "router", _kill_daemon(lab, "bird", restart))


FAULTS: tuple[Fault, ...] = (
    Fault("agent-kill", "kill -9 an n2 agent, `plexus lab up` after 5 s", agent_kill),
    Fault("etcd-kill", "kill -9 a cluster's etcd, `plexus lab up` after 5 s", etcd_kill),
    Fault("etcd-freeze", "SIGSTOP a cluster's etcd for 15 s", etcd_freeze),
    Fault("apiserver-kill", "kill -9 a clustermesh-apiserver, `plexus lab up` after 5 s",
          apiserver_kill),
    Fault("exabgp-kill", "kill -9 a node's ExaBGP (its agent restarts it)", exabgp_kill),
    Fault("wireguard-kill", "kill -9 an n2 node's wireguard-go", wireguard_kill),
    Fault("bird-reconfigure", "`birdc configure` on the router", bird_reconfigure),
    Fault("bgp-session-reset", "`birdc restart` of one node's BGP session", bgp_session_reset),
    Fault("bird-kill", "kill -9 BIRD, `plexus lab up` after 5 s", bird_kill),
)


def schedule(seed: int, count: int, kinds: list[str] | None = None) -> list[Fault]:
    """The faults of a run, in order: the same seed (and `kinds`) gives the same list."""
    rng = random.Random(seed)
    pool = [f for f in FAULTS if kinds is None or f.kind in kinds]
    return [rng.choice(pool) for _ in range(count)]

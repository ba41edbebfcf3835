"""Helpers for tests: wait for conditions, real daemons, fresh network namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                     what: str | Callable[[], str] = "") -> Any:
    """Poll `cond` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return value
        except AssertionError as e:
            last_exc = e
        if time.monotonic() > deadline:
            desc = what() if callable(what) else (what or cond)
            raise AssertionError(f"condition not met within {timeout}s: {desc}") from last_exc
        await asyncio.sleep(interval)


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               what: str | Callable[[], str] = "") -> Any:
    """The blocking twin of `eventually`; a callable `what` explains a timeout (state dumps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            desc = what() if callable(what) else (what or cond)
            raise AssertionError(f"condition not met within {timeout}s: {desc}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a process this test started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass
class Etcd:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return self.client_url

    def start(self, extra: list[str] | None = None) -> None:
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
             "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", f"{self.name}={self.peer_url}",
             "--logger", "zap", "--log-level", "error", *(extra or [])],
            stdout=log, stderr=log)
        log.close()
        wait_until(self.healthy, 20, what=f"etcd {self.name} healthy")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited with {self.proc.returncode}")
        r = subprocess.run(["etcdctl", "--endpoints", self.client_url, "endpoint", "health"],
                           capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10)
        return r.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None


@contextmanager
def etcd_server(name: str = "test") -> Iterator[Etcd]:
    """A real single-member etcd on loopback, gone afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="plexus-etcd-"))
    e = Etcd(name, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", tmp / "data")
    try:
        e.start()
        yield e
    finally:
        e.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def unique(prefix: str = "plx-t") -> str:
    """A name no other test uses (namespace names; links need <= 15 chars)."""
    return f"{prefix}{secrets.token_hex(3)}"


def sh(*cmd: str, check: bool = True, ns: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


# Every namespace a test makes is recorded here with the PID of the run that made it, so a
# run killed before its cleanup (a timeout, a stopped CI) is cleaned up by the next one.
NETNS_RECORDS = Path("/run/plexus-tests/netns")


def add_netns(name: str) -> None:
    """Make a test namespace (loopback up) and record it as this run's."""
    NETNS_RECORDS.mkdir(parents=True, exist_ok=True)
    (NETNS_RECORDS / name).write_text(f"{os.getpid()}\n")
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", ns=name)


def del_netns(name: str) -> None:
    """Delete a test namespace and its record."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    (NETNS_RECORDS / name).unlink(missing_ok=True)


def _run_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep_stale_netns() -> list[str]:
    """Remove the namespaces a dead run recorded, and stop what the run left running in
    them (its own processes, found by PID inside its own namespace). Called with the machine
    lock held, so no live run is using them."""
    swept = []
    for record in sorted(NETNS_RECORDS.glob("*")) if NETNS_RECORDS.is_dir() else []:
        owner = int(record.read_text().strip() or 0)
        if owner and _run_alive(owner):
            continue
        pids = subprocess.run(["ip", "netns", "pids", record.name], capture_output=True, text=True).stdout
        for pid in (int(p) for p in pids.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        del_netns(record.name)
        swept.append(record.name)
    return swept


@contextmanager
def netns(prefix: str = "plx-t") -> Iterator[str]:
    """A fresh network namespace with loopback up, deleted afterwards."""
    name = unique(prefix)
    try:
        add_netns(name)
        yield name
    finally:
        del_netns(name)


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    socket: Path
    state_dir: Path
    log: Path

    def stop(self) -> None:
        stop_pid(self.proc)


def start_agent(workdir: Path, *, cluster: str = "east", cluster_id: int = 1, node: str = "n1",
                ip: str = "172.31.1.11", pod_cidr: str = "10.1.1.0/24", extra: str = "",
                metrics_port: int | None = None) -> AgentProcess:
    """A real `plexus agent` process with its socket and state in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "agent.sock"
    cfg = workdir / "agent.yaml"
    cfg.write_text(
        f"cluster: {{name: {cluster}, id: {cluster_id}}}\n"
        f"node: {{name: {node}, ip: {ip}, podCIDR: {pod_cidr}}}\n"
        f"stateDir: {workdir / 'state'}\n"
        f"apiSocket: {sock}\n"
        f"metrics: {{port: {metrics_port if metrics_port else 'null'}}}\n" + extra)
    log = workdir / "agent.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "plexus", "agent", "--config", str(cfg)],
                                cwd=ROOT, stderr=logf)
    agent = AgentProcess(proc, sock, workdir / "state", log)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 30, what="agent socket")
        if proc.poll() is not None:
            raise AssertionError(f"agent exited: {log.read_text()[-2000:]}")
    except BaseException:
        agent.stop()
        raise
    return agent


@contextmanager
def etcd_cluster(size: int = 3) -> Iterator[list[Etcd]]:
    """A real multi-member etcd cluster on loopback."""
    tmp = Path(tempfile.mkdtemp(prefix="plexus-etcd-cluster-"))
    members = [Etcd(f"m{i}", f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                    tmp / f"m{i}") for i in range(size)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    procs = []
    try:
        for m in members:
            log = open(tmp / f"{m.name}.log", "ab")
            m.proc = subprocess.Popen(
                ["etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                 "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                 "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-level", "error"], stdout=log, stderr=log)
            log.close()
            procs.append(m.proc)
        for m in members:
            wait_until(m.healthy, 30, what=f"etcd member {m.name} healthy")
        yield members
    finally:
        for m in members:
            m.stop()
        shutil.rmtree(tmp, ignore_errors=True)


ECHO_SERVER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
if proto == "tcp":
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(c.recv(65536))
        c.close()
else:
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)
"""

ECHO_CLIENT = r"""
import socket, sys
proto, ip, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.settimeout(float(sys.argv[5]))
if proto == "tcp":
    s.connect((ip, port))
    s.sendall(payload)
    data = s.recv(65536)
else:
    s.sendto(payload, (ip, port))
    data, _ = s.recvfrom(65536)
sys.exit(0 if data == payload else 3)
"""


@contextmanager
def _script_server(ns: str, script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Python `script` run inside namespace `ns`, yielded once it prints "ready", stopped by
    PID afterwards."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        stop_pid(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def echo_server(ns: str, proto: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A TCP or UDP echo server inside namespace `ns`, stopped by PID afterwards."""
    with _script_server(ns, ECHO_SERVER, proto, str(port)) as proc:
        yield proc


def echo(ns: str, proto: str, ip: str, port: int, payload: str, timeout: float = 2.0) -> bool:
    """True when `payload` sent from `ns` comes back from the echo server at ip:port."""
    return not echo_error(ns, proto, ip, port, payload, timeout)


def echo_error(ns: str, proto: str, ip: str, port: int, payload: str, timeout: float = 2.0) -> str:
    """Why the echo failed (the client's last error line), or "" when it came back."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO_CLIENT, proto, ip,
                        str(port), payload, str(timeout)], capture_output=True, text=True,
                       timeout=timeout + 10)
    if r.returncode == 0:
        return ""
    return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


WHOAMI_SERVER = r"""
import socket, sys, threading
proto, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
print("ready", flush=True)

def serve(c):
    with c:
        while c.recv(65536):
            c.sendall(name)

if proto == "tcp":
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
else:
    while True:
        _, peer = s.recvfrom(65536)
        s.sendto(name, peer)
"""

WHOAMI_CLIENT = r"""
import json, socket, sys
proto, ip, port, conns, msgs, timeout = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                         int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
out = []
for _ in range(conns):
    names = []
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))  # UDP too: only replies from ip:port are received
        for _ in range(msgs):
            s.send(b"?")
            names.append(s.recv(65536).decode())
    except OSError as e:
        names.append(None)
        sport = s.getsockname()[1] if s.fileno() >= 0 else 0
        print(f"{proto} from port {sport}: {e!r} after {names[:-1]}", file=sys.stderr)
    finally:
        s.close()
    out.append(names)
print(json.dumps(out))
"""


@contextmanager
def whoami_server(ns: str, proto: str, port: int, name: str) -> Iterator[subprocess.Popen[str]]:
    """A TCP or UDP server in `ns` that answers every message with `name`."""
    with _script_server(ns, WHOAMI_SERVER, proto, str(port), name) as proc:
        yield proc


def whoami(ns: str, proto: str, ip: str, port: int, conns: int = 1, msgs: int = 1,
           timeout: float = 2.0, errors: list[str] | None = None) -> list[list[str | None]]:
    """From `ns`, `conns` connections (sockets) to ip:port, `msgs` messages each: who
    answered each message (None where a connection failed; why goes to `errors`)."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", WHOAMI_CLIENT, proto, ip,
                        str(port), str(conns), str(msgs), str(timeout)], capture_output=True,
                       text=True, timeout=conns * (msgs + 1) * timeout + 20)
    assert r.returncode == 0, r.stderr
    if errors is not None:
        errors.extend(r.stderr.splitlines())
    result: list[list[str | None]] = json.loads(r.stdout)
    return result


class TcpProxy:
    """A loopback TCP proxy to `target` that a test can cut (listener and every connection
    closed) and restore on the same port, to take a client offline without stopping the
    server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.close()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()
                self._writers.discard(w)

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

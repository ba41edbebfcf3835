"""`plexus lab up | status | down | pod`: build, inspect and remove the lab.

Every address lives inside namespaces the lab made; the root namespace gets nothing.
Processes are recorded by PID in the state file and stopped by those PIDs only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.pki import connect, etcd_auth_commands, etcd_tls_args, etcdctl_tls, make_cluster_pki
from plexus.cni.errors import CniError
from plexus.cni.runtime import call_plugin
from plexus.commands.common import LAB_DIR, lab_socket
from plexus.core.client import Client, ClientError
from plexus.lab import ops
from plexus.lab.ops import LabError
from plexus.lab.topology import (
    POD_NAME_RE,
    ROUTER,
    Cluster,
    Host,
    Node,
    Topology,
    default,
    is_lab_netns,
    pod_netns,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BPF_DIR = Path("/sys/fs/bpf/plexus-lab")  # older labs pinned here
WG_DIR = Path("/run/wireguard")


@dataclass
class Process:
    name: str
    netns: str
    pid: int
    marker: str
    log: str


@dataclass
class State:
    processes: dict[str, Process] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        fields = set(Process.__dataclass_fields__)
        # a state file from another version may carry more: keep what this one knows
        return cls({k: Process(**{f: v[f] for f in fields if f in v})
                    for k, v in raw.get("processes", {}).items()}, raw.get("pods", {}))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": {k: v.__dict__ for k, v in self.processes.items()},
                                   "pods": self.pods}, indent=1))
        os.replace(tmp, path)


class Lab:
    def __init__(self, topo: Topology | None = None, root: Path = LAB_DIR,
                 say: Callable[[str], None] = print) -> None:
        self.topo = topo or default()
        self.root = root
        self.state_path = root / "state.json"
        self.say = say

    # ---- paths ----------------------------------------------------------------------
    def node_dir(self, node: Node) -> Path:
        return self.root / "nodes" / node.key

    def socket(self, node: Node) -> Path:
        return lab_socket(node.key) if self.root == LAB_DIR else self.node_dir(node) / "agent.sock"

    # ---- up -------------------------------------------------------------------------
    def up(self) -> None:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        state = State.load(self.state_path)
        self.say("==> network: router, segments, hosts")
        self._mount_bpffs()
        self._network()
        self.say("==> router: BIRD 2")
        self._start(state, "bird", ROUTER, self._bird_argv(), self._bird_ready)
        for c in self.topo.clusters:
            self.say(f"==> cluster {c.name} (id {c.id}): etcd (TLS) on {c.control_plane.ip}, "
                     "clustermesh-apiserver")
            make_cluster_pki(c.name, self.pki(c.name), [c.control_plane.ip, "127.0.0.1"],
                             advertise=[c.control_plane.ip])
            self._start(state, f"etcd-{c.name}", c.control_plane.netns, self._etcd_argv(c),
                        lambda c=c: self.etcd_healthy(c.control_plane.netns, c))
            self._etcd_auth(c)
            self._start(state, f"apiserver-{c.name}", c.control_plane.netns,
                        self._apiserver_argv(c), lambda c=c: self._apiserver_synced(c),
                        env={"PYTHONPATH": str(REPO_ROOT)})
        for n in self.topo.nodes():
            self._write_agent_config(n)
        self.say("==> clustermesh: connecting " + " <-> ".join(c.name for c in self.topo.clusters))
        self._connect_clusters()
        for n in self.topo.nodes():
            self.say(f"==> node {n.key} ({n.host.ip}, pods {n.pod_cidr}): plexus agent")
            self._start(state, f"agent-{n.key}", n.host.netns, self._agent_argv(n),
                        lambda n=n: self._agent_ready(n), env={"PYTHONPATH": str(REPO_ROOT)})
        state.save(self.state_path)
        self.say("==> waiting for every agent to sync every cluster")
        ops.wait_for(self._mesh_ready, 90, "clustermesh to be ready on every node", interval=0.2)
        self.say(f"==> lab is up ({time.monotonic() - started:.1f}s)")

    @property
    def bpffs(self) -> Path:
        """The lab's bpf filesystem: `ip netns exec` hides /sys/fs/bpf, not this."""
        return self.root / "bpffs"

    def _mount_bpffs(self) -> None:
        self.bpffs.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(self.bpffs):
            ops.run("mount", "-t", "bpf", "plexus-lab", str(self.bpffs))

    def _network(self) -> None:
        ops.ensure_netns(ROUTER)
        ops.sysctl(ROUTER, "net.ipv4.ip_forward", "1")
        for seg in self.topo.segments:
            if not ops.link_exists(ROUTER, seg.bridge):
                ops.run("ip", "-n", ROUTER, "link", "add", seg.bridge, "type", "bridge")
                ops.run("ip", "-n", ROUTER, "addr", "add", f"{seg.gateway}/{seg.prefixlen}",
                        "dev", seg.bridge)
            ops.run("ip", "-n", ROUTER, "link", "set", seg.bridge, "up")
        for host in self.topo.hosts():
            self._host(host)

    def _host(self, host: Host) -> None:
        ops.ensure_netns(host.netns)
        if not ops.link_exists(host.netns, "eth0"):
            if ops.link_exists(ROUTER, host.router_link):
                ops.run("ip", "-n", ROUTER, "link", "del", host.router_link)
            # Both ends are created inside namespaces: nothing touches the root namespace.
            ops.run("ip", "-n", ROUTER, "link", "add", host.router_link, "type", "veth",
                    "peer", "name", "eth0", "netns", host.netns)
            ops.run("ip", "-n", host.netns, "addr", "add",
                    f"{host.ip}/{host.segment.prefixlen}", "dev", "eth0")
        ops.run("ip", "-n", ROUTER, "link", "set", host.router_link, "master",
                host.segment.bridge, "up")
        ops.run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        ops.run("ip", "-n", host.netns, "route", "replace", "default", "via", host.segment.gateway)
        if host.role == "node":
            ops.sysctl(host.netns, "net.ipv4.ip_forward", "1")

    def _start(self, state: State, name: str, ns: str, argv: list[str],
               ready: Callable[[], bool], env: dict[str, str] | None = None,
               timeout: float = 60) -> None:
        proc = state.processes.get(name)
        if proc is None or not ops.alive(proc.pid, proc.marker):
            log = self.root / "logs" / f"{name}.log"
            pid = ops.spawn(ns, argv, log, env)
            proc = Process(name, ns, pid, str(self.root), str(log))
            state.processes[name] = proc
            state.save(self.state_path)

        def ok() -> bool:
            if not ops.alive(proc.pid, proc.marker):
                tail = Path(proc.log).read_text(errors="replace")[-1500:] if Path(proc.log).exists() else ""
                raise LabError(f"{name} exited; last log lines:\n{tail}")
            return ready()

        ops.wait_for(ok, timeout, f"{name} to be ready")

    # ---- BIRD -----------------------------------------------------------------------
    def bird_socket(self) -> Path:
        return self.root / "router" / "bird.ctl"

    def _bird_argv(self) -> list[str]:
        conf = self.root / "router" / "bird.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(self.bird_config())
        return ["bird", "-f", "-c", str(conf), "-s", str(self.bird_socket())]

    def bird_config(self) -> str:
        seg = self.topo.segments[0]
        statics = "\n".join(f"  route {n.pod_cidr} via {n.host.ip};" for n in self.topo.nodes())
        return f"""# Written by plexus lab: the datacenter router.
router id {seg.gateway};
protocol device {{ }}
protocol direct {{ ipv4; }}
protocol kernel {{
  ipv4 {{ export where source != RTS_DEVICE; }};
}}
# Pod CIDRs until the nodes announce them over BGP.
protocol static pods {{
  ipv4;
{statics}
}}
"""

    def birdc(self, *args: str) -> str:
        return ops.run("birdc", "-s", str(self.bird_socket()), *args, check=False).stdout

    def _bird_ready(self) -> bool:
        return "Daemon is up and running" in self.birdc("show", "status")

    # ---- etcd -----------------------------------------------------------------------
    def pki(self, cluster: str) -> Path:
        return self.root / "pki" / cluster

    def _etcd_argv(self, c: Cluster) -> list[str]:
        data = self.root / "clusters" / c.name / "etcd"
        data.parent.mkdir(parents=True, exist_ok=True)
        return ["etcd", "--name", c.name, "--data-dir", str(data),
                "--listen-client-urls", f"{c.etcd_url},https://127.0.0.1:2379",
                "--advertise-client-urls", c.etcd_url,
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", f"{c.name}=http://127.0.0.1:2380",
                *etcd_tls_args(self.pki(c.name)),
                "--logger", "zap", "--log-level", "warn"]

    def etcdctl(self, ns: str, c: Cluster, *args: str, url: str | None = None,
                check: bool = False) -> ops.subprocess.CompletedProcess[str]:
        return ops.run("etcdctl", "--endpoints", url or c.etcd_url, "--dial-timeout", "2s",
                       *etcdctl_tls(self.pki(c.name)), *args, ns=ns, check=check)

    def etcd_healthy(self, ns: str, c: Cluster) -> bool:
        return self.etcdctl(ns, c, "endpoint", "health").returncode == 0

    def _etcd_auth(self, c: Cluster) -> None:
        marker = self.root / "clusters" / c.name / "auth-enabled"
        if marker.exists():
            return
        for cmd in etcd_auth_commands(c.name):
            self.etcdctl(c.control_plane.netns, c, *cmd, check=True)
        marker.write_text("users root and remote, roles root and remote\n")

    def _apiserver_argv(self, c: Cluster) -> list[str]:
        pki = self.pki(c.name)
        return [sys.executable, "-m", "plexus", "clustermesh-apiserver", "--cluster-name", c.name,
                "--cluster-id", str(c.id), "--etcd", "https://127.0.0.1:2379",
                "--cacert", str(pki / "ca.crt"), "--cert", str(pki / "admin.crt"),
                "--key", str(pki / "admin.key"), "--identity-gc-grace", "60"]

    def _apiserver_synced(self, c: Cluster) -> bool:
        r = self.etcdctl(c.control_plane.netns, c, "get", "--prefix", "--keys-only",
                         f"cilium/synced/{c.name}/")
        return r.returncode == 0 and r.stdout.count("cilium/synced/") >= 4

    def _connect_clusters(self) -> None:
        clusters = self.topo.clusters
        dirs = {c.name: [self.node_dir(n) / "clustermesh" for n in c.nodes] for c in clusters}
        for i, a in enumerate(clusters):
            for b in clusters[i + 1:]:
                connect(a.name, b.name, self.root / "pki", dirs)

    def _mesh_ready(self) -> bool:
        want = {c.name for c in self.topo.clusters}
        for n in self.topo.nodes():
            try:
                st = Client(self.socket(n), timeout=3).get("/v1/clustermesh/status")
            except ClientError:
                return False
            ready = {name for name, c in st["clusters"].items() if c.get("ready")}
            if ready != want:
                return False
        return True

    # ---- agents ---------------------------------------------------------------------
    def _write_agent_config(self, n: Node) -> Path:
        c = self.topo.cluster(n.cluster)
        d = self.node_dir(n)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "agent.yaml"
        path.write_text(
            f"# Written by plexus lab for node {n.key}.\n"
            f"cluster: {{name: {c.name}, id: {c.id}}}\n"
            f"node: {{name: {n.name}, ip: {n.host.ip}, podCIDR: {n.pod_cidr}}}\n"
            f"stateDir: {d / 'state'}\n"
            f"apiSocket: {self.socket(n)}\n"
            f"metrics: {{address: {n.host.ip}, port: 9962}}\n"
            f"clustermesh:\n"
            f"  etcd:\n"
            f"    endpoints: ['{c.etcd_url}']\n"
            f"    trustedCaFile: {self.pki(c.name) / 'ca.crt'}\n"
            f"    certFile: {self.pki(c.name) / 'admin.crt'}\n"
            f"    keyFile: {self.pki(c.name) / 'admin.key'}\n"
            f"  configDir: {d / 'clustermesh'}\n"
            f"encryption: {{enabled: true, device: {self.wg_device(n)}, strict: true}}\n"
            f"bpf: {{enabled: true, pinDir: {self.bpffs / n.key}}}\n")
        (d / "clustermesh").mkdir(exist_ok=True)
        return path

    @staticmethod
    def wg_device(n: Node) -> str:
        return f"plxwg-{n.cluster[0]}{n.name.removeprefix('n')}"

    def _agent_argv(self, n: Node) -> list[str]:
        return [sys.executable, "-m", "plexus", "agent", "--config",
                str(self.node_dir(n) / "agent.yaml")]

    def _agent_ready(self, n: Node) -> bool:
        try:
            Client(self.socket(n), timeout=2).get("/v1/status")
            return True
        except ClientError:
            return False

    # ---- pods -----------------------------------------------------------------------
    def pod_add(self, cluster: str, node_name: str, pod: str, labels: dict[str, str],
                namespace: str = "default") -> dict[str, Any]:
        if not POD_NAME_RE.match(pod):
            raise LabError(f"pod name {pod!r} must be lower-case alphanumerics and '-', "
                           "at most 22 characters")
        node = self.topo.node(cluster, node_name)
        ns = pod_netns(node, pod)
        state = State.load(self.state_path)
        ops.ensure_netns(ns)
        try:
            result = call_plugin(
                "ADD", container_id=f"lab-{node.key}-{pod}", netns=f"/var/run/netns/{ns}",
                host_netns=node.host.netns, config=self._cni_config(node, labels),
                cni_args={"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": pod})
        except CniError as e:
            ops.delete_netns(ns)
            raise LabError(f"CNI ADD for {pod} on {node.key} failed: {e}") from None
        ip = result["ips"][0]["address"].split("/")[0]
        state.pods[ns] = {"cluster": cluster, "node": node_name, "pod": pod, "ip": ip,
                          "namespace": namespace, "labels": labels}
        state.save(self.state_path)
        return state.pods[ns]

    def pod_del(self, cluster: str, node_name: str, pod: str) -> None:
        node = self.topo.node(cluster, node_name)
        ns = pod_netns(node, pod)
        state = State.load(self.state_path)
        info = state.pods.get(ns, {})
        try:
            call_plugin("DEL", container_id=f"lab-{node.key}-{pod}", netns=f"/var/run/netns/{ns}",
                        host_netns=node.host.netns,
                        config=self._cni_config(node, info.get("labels", {})))
        finally:
            ops.delete_netns(ns)
            state.pods.pop(ns, None)
            state.save(self.state_path)

    def _cni_config(self, node: Node, labels: dict[str, str]) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "plexus", "type": "plexus-cni",
                "agentSocket": str(self.socket(node)), "args": {"plexus": {"labels": labels}}}

    def pods(self) -> dict[str, dict[str, Any]]:
        return State.load(self.state_path).pods

    # ---- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = State.load(self.state_path)
        present = ops.namespaces()
        agents: dict[str, Any] = {}
        for n in self.topo.nodes():
            try:
                agents[n.key] = Client(self.socket(n), timeout=3).get("/v1/status")
            except ClientError as e:
                agents[n.key] = {"error": str(e)}
        return {
            "namespaces": {ns: ns in present for ns in self.topo.namespaces()},
            "processes": {p.name: {"pid": p.pid, "netns": p.netns,
                                   "alive": ops.alive(p.pid, p.marker)}
                          for p in state.processes.values()},
            "agents": agents,
            "pods": state.pods,
            "router_routes": self.birdc("show", "route") if ROUTER in present else "",
        }

    # ---- down -----------------------------------------------------------------------
    def down(self) -> list[str]:
        done: list[str] = []
        state = State.load(self.state_path)
        for p in state.processes.values():
            if ops.alive(p.pid, p.marker):
                ops.stop(p.pid, p.marker)
                done.append(f"stopped {p.name} (pid {p.pid})")
        # wireguard-go outlives its agent by design (stop is not remove): stop the lab's.
        for n in self.topo.nodes():
            pid_file = self.node_dir(n) / "state" / "wireguard-go.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().strip() or 0)
                if pid and ops.alive(pid, self.wg_device(n)):
                    ops.stop(pid, self.wg_device(n))
                    done.append(f"stopped wireguard-go {self.wg_device(n)} (pid {pid})")
        for ns in sorted(ops.namespaces()):
            if is_lab_netns(ns, self.topo):
                ops.delete_netns(ns)
                done.append(f"deleted netns {ns}")
        if BPF_DIR.exists():
            shutil.rmtree(BPF_DIR, ignore_errors=True)
            done.append(f"removed {BPF_DIR}")
        for sock in WG_DIR.glob("plxwg-*.sock") if WG_DIR.exists() else []:
            sock.unlink(missing_ok=True)
            done.append(f"removed {sock}")
        if os.path.ismount(self.bpffs):
            ops.run("umount", str(self.bpffs), check=False)
            done.append(f"unmounted {self.bpffs} (pinned maps gone)")
        if self.root.exists():
            shutil.rmtree(self.root)
            done.append(f"removed {self.root}")
        return done

"""`plexus lab up | status | down | pod`: build, inspect and remove the lab.

Every address lives inside namespaces the lab made; the root namespace gets nothing.
Processes are recorded by PID in the state file and stopped by those PIDs only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from clustermesh.pki import (
    REMOTE_PORT,
    connect,
    etcd_auth_commands,
    etcd_tls_args,
    etcdctl_tls,
    make_cluster_pki,
    make_flows_pki,
)
from plexus.cni.errors import CniError
from plexus.cni.runtime import call_plugin
from plexus.commands.common import LAB_DIR, lab_apiserver_socket, lab_relay_socket, lab_socket
from plexus.core.client import Client, ClientError
from plexus.lab import external, ops
from plexus.lab.ops import LabError
from plexus.lab.topology import (
    POD_NAME_RE,
    ROUTER,
    ROUTER_ASN,
    Cluster,
    EtcdMember,
    Host,
    Node,
    Topology,
    default,
    is_lab_netns,
    pod_netns,
    with_etcd_members,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BPF_DIR = Path("/sys/fs/bpf/plexus-lab")  # where older labs pinned; removed if found
WG_DIR = Path("/var/run/wireguard")
APISERVER_METRICS_PORT = 9963  # each control plane is its own namespace
FLOWS_PORT = 4244  # every agent serves its flows to the relays there (mutual TLS)
RELAY_PORT = 4245  # each relay's web page, on its control plane's loopback
KVSTOREMESH_METRICS_PORT = 9965  # the relay has 9964 on the control plane's address
MESH_MODES = ("direct", "kvstoremesh")
VM_LABELS = "app=db,env=lab"  # what the lab's policies select the VM by
VM_LEASE = 10  # seconds: the lab's VM is withdrawn this soon after it goes silent


# Stop order, last tier first: agents go before the etcd they talk to.
TIER_ROUTER, TIER_CONTROL_PLANE, TIER_NODE = 0, 1, 2


@dataclass(frozen=True)
class Daemon:
    """One process the lab runs: where, how, and when it counts as ready.

    `files` are written before it starts; when one changes under a running daemon, `reload`
    applies it in place, or, without `reload`, the daemon is restarted. `after` runs once the
    daemon is ready (idempotent setup such as etcd users).
    """

    name: str
    netns: str
    tier: int
    argv: list[str]
    ready: Callable[[], bool]
    files: dict[Path, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    reload: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    timeout: float = 60


@dataclass
class Process:
    name: str
    netns: str
    pid: int
    marker: str
    log: str
    tier: int = TIER_NODE


@dataclass
class State:
    processes: dict[str, Process] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    repo: str = str(REPO_ROOT)
    etcd_members: dict[str, int] = field(default_factory=dict)  # per cluster, as last brought up
    mesh_mode: str = "direct"  # how agents read the remote clusters, as last brought up

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        fields = set(Process.__dataclass_fields__)
        # a state file from another version may carry more: keep what this one knows
        return cls({k: Process(**{f: v[f] for f in fields if f in v})
                    for k, v in raw.get("processes", {}).items()},
                   raw.get("pods", {}), raw.get("repo", str(REPO_ROOT)),
                   raw.get("etcd_members", {}), raw.get("mesh_mode", "direct"))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"repo": self.repo,
                                   "processes": {k: v.__dict__ for k, v in self.processes.items()},
                                   "pods": self.pods, "etcd_members": self.etcd_members,
                                   "mesh_mode": self.mesh_mode},
                                  indent=1))
        os.replace(tmp, path)

    def alive(self) -> list[Process]:
        return [p for p in self.processes.values() if ops.alive(p.pid, p.marker)]


class Lab:
    def __init__(self, topo: Topology | None = None, root: Path = LAB_DIR,
                 say: Callable[[str], None] = print) -> None:
        self.root = root
        self.state_path = root / "state.json"
        self.say = say
        if topo is None:  # the lab as it was brought up: as many etcd members as then
            topo = default()
            recorded = State.load(self.state_path).etcd_members
            known = {c.name for c in topo.clusters}
            topo = with_etcd_members(topo, {k: v for k, v in recorded.items() if k in known})
        self.topo = topo
        # direct: agents connect to every remote's etcd; kvstoremesh: one kvstoremesh per
        # cluster copies the remotes into its etcd, where its agents read them
        self.mesh_mode = State.load(self.state_path).mesh_mode

    @property
    def kvstoremesh(self) -> bool:
        return self.mesh_mode == "kvstoremesh"

    # ---- paths ----------------------------------------------------------------------
    def node_dir(self, node: Node) -> Path:
        return self.root / "nodes" / node.key

    def socket(self, node: Node) -> Path:
        return lab_socket(node.key) if self.root == LAB_DIR else self.node_dir(node) / "agent.sock"

    # ---- up -------------------------------------------------------------------------
    def up(self, etcd_members: int | None = None, mesh_mode: str | None = None) -> None:
        """Build what is missing. `etcd_members` per cluster (default: as the lab has them, or
        1); a lab whose etcd holds data is not switched to another count: down first. The
        same for `mesh_mode` (default: as the lab has it, or direct)."""
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        state = self._own_state()
        if etcd_members is not None:
            self._set_etcd_members(etcd_members)
        if mesh_mode is not None:
            self._set_mesh_mode(state, mesh_mode)
        state.etcd_members = {c.name: c.etcd_members for c in self.topo.clusters}
        state.mesh_mode = self.mesh_mode
        state.save(self.state_path)
        self.say("==> network: router, segments, hosts")
        self._mount_bpffs()
        missing = set(self.topo.namespaces()) - ops.namespaces()
        self._network()
        self._stop_orphans(state, missing)
        self.say("==> router: BIRD 2")
        self._ensure_all(state, [self.router_daemons()])
        for host in self.topo.external:
            self.say(f"==> external server {host.netns} ({host.ip}:{external.PORT}) records its clients")
        self._ensure_all(state, [self.external_daemons(h) for h in self.topo.external])
        for c in self.topo.clusters:
            self.say(f"==> cluster {c.name} (id {c.id}) on {c.control_plane.ip}: "
                     + ", ".join(d.name for d in self.control_plane(c)))
            self._cluster_pki(c)
        self._ensure_all(state, [self.control_plane(c) for c in self.topo.clusters])
        self.say("==> clustermesh: connecting " + " <-> ".join(c.name for c in self.topo.clusters))
        self._connect_clusters()
        for n in self.topo.nodes():
            self.say(f"==> node {n.key} ({n.host.ip}, pods {n.pod_cidr}): "
                     + ", ".join(d.name for d in self.node_daemons(n)))
        self._ensure_all(state, [self.node_daemons(n) for n in self.topo.nodes()])
        for vm in self.topo.vms:
            self.say(f"==> VM {vm.netns} ({vm.ip}) enrols into {self.vm_cluster(vm).name}: "
                     + ", ".join(d.name for d in self.vm_daemons(vm)))
            self._enrol_vm(vm)
        self._ensure_all(state, [self.vm_daemons(vm) for vm in self.topo.vms])
        self.say("==> waiting for every agent to sync every cluster")
        ops.wait_for(self._mesh_ready, 90, "clustermesh to be ready on every node", interval=0.2)
        ops.wait_for(self._vms_in_mesh, 60, "every node of every cluster to know the VMs",
                     interval=0.2)
        self.say("==> BGP: every node peers with the router and announces its pod CIDR")
        self._apply_bgp()
        ops.wait_for(self._bgp_routes_in, 90, "the router to learn every pod CIDR over BGP",
                     interval=0.3)
        self.say("==> relays: every node's flows, one stream per cluster")
        self._ensure_all(state, [self.relay_daemons(c) for c in self.topo.clusters])
        self.say(f"==> lab is up ({time.monotonic() - started:.1f}s)")

    def wireguard_devices(self) -> list[tuple[str, Path, str]]:
        """(namespace, state dir, device) of every wireguard-go the lab's agents start."""
        return ([(n.host.netns, self.node_dir(n) / "state", n.wg_device) for n in self.topo.nodes()]
                + [(vm.netns, self.vm_dir(vm) / "state", self.vm_wg_device(vm))
                   for vm in self.topo.vms])

    def _stop_orphans(self, state: State, missing: set[str]) -> None:
        """A process whose namespace was deleted runs on in a namespace nobody reaches (its link
        goes when the namespace is made again): stop it, and its wireguard-go, whose UAPI socket
        a new agent would otherwise adopt; `_ensure_all` starts them in the new namespace."""
        for p in list(state.processes.values()):
            if p.netns in missing and ops.alive(p.pid, p.marker):
                self.say(f"  {p.name}: namespace {p.netns} was gone; stopping pid {p.pid}")
                ops.stop(p.pid, p.marker)
        for netns, state_dir, device in self.wireguard_devices():
            pid_file = state_dir / "wireguard-go.pid"
            if netns in missing and pid_file.exists():
                pid = int(pid_file.read_text().strip() or 0)
                if pid and ops.alive(pid, device):
                    ops.stop(pid, device)
                (WG_DIR / f"{device}.sock").unlink(missing_ok=True)

    def _set_etcd_members(self, count: int) -> None:
        try:
            wanted = with_etcd_members(self.topo, count)
        except ValueError as e:
            raise LabError(str(e)) from None
        for have, want in zip(self.topo.clusters, wanted.clusters, strict=True):
            if have.etcd_members != want.etcd_members and any(
                    self.etcd_data(have, m).exists() for m in have.etcd):
                raise LabError(
                    f"cluster {have.name} runs {have.etcd_members} etcd member(s) holding the "
                    f"lab's state; {want.etcd_members} would be a new etcd: `plexus lab down` "
                    f"first, then `plexus lab up --etcd-members {want.etcd_members}`")
        self.topo = wanted

    def _set_mesh_mode(self, state: State, mode: str) -> None:
        if mode not in MESH_MODES:
            raise LabError(f"mesh mode {mode!r}: one of {', '.join(MESH_MODES)}")
        if mode != self.mesh_mode and state.alive():
            flag = " --kvstoremesh" if mode == "kvstoremesh" else ""
            raise LabError(f"the lab runs its clustermesh in {self.mesh_mode} mode; for {mode}: "
                           f"`plexus lab down` first, then `plexus lab up{flag}`")
        self.mesh_mode = mode

    @property
    def bpffs(self) -> Path:
        """The lab's bpf filesystem: `ip netns exec` hides /sys/fs/bpf, not this."""
        return self.root / "bpffs"

    def _mount_bpffs(self) -> None:
        self.bpffs.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(self.bpffs):
            ops.run("mount", "-t", "bpf", "plexus-lab", str(self.bpffs))

    def _own_state(self) -> State:
        """The state, refusing a lab that another checkout runs: its processes run its code."""
        state = State.load(self.state_path)
        if state.repo != str(REPO_ROOT) and state.alive():
            raise LabError(f"the lab is up from {state.repo}; use that checkout's "
                           "`plexus lab down` first (or `plexus lab down --force`)")
        state.repo = str(REPO_ROOT)
        return state

    def router_daemons(self) -> list[Daemon]:
        conf = self.root / "router" / "bird.conf"
        return [Daemon("bird", ROUTER, TIER_ROUTER,
                       ["bird", "-f", "-c", str(conf), "-s", str(self.bird_socket())],
                       self._bird_ready, files={conf: self.bird_config()}, reload=self._bird_reload)]

    def external_daemons(self, host: Host) -> list[Daemon]:
        """The server beyond the egress gateway that records the source address of every client."""
        return [Daemon(f"external-{host.short}", host.netns, TIER_ROUTER,
                       [sys.executable, "-m", "plexus.lab.external", "--bind", host.ip,
                        "--state-dir", str(self.root)],
                       partial(self._external_ready, host), env={"PYTHONPATH": str(REPO_ROOT)})]

    @staticmethod
    def _external_ready(host: Host) -> bool:
        listening = ops.run("ss", "-ltnH", ns=host.netns, check=False).stdout
        return all(f"{host.ip}:{port} " in listening for port in (external.PORT, external.QUERY_PORT))

    def external_clients(self, host: Host | None = None, since: int = 0) -> list[dict[str, Any]]:
        """What the external server recorded: {seq, ip, port, time} per connection, from `since`."""
        host = host or self.topo.external[0]
        url = f"http://{host.ip}:{external.QUERY_PORT}/clients?since={since}"
        r = ops.run(sys.executable, "-c", "import sys, urllib.request; "
                    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                    url, ns=host.netns, check=False)
        if r.returncode != 0:
            raise LabError(f"the external server {host.netns} did not answer {url}: {r.stderr.strip()}")
        clients: list[dict[str, Any]] = json.loads(r.stdout)["clients"]
        return clients

    def control_plane(self, c: Cluster) -> list[Daemon]:
        """The processes of one cluster's control plane, in start order."""
        ns = c.control_plane.netns
        py = {"PYTHONPATH": str(REPO_ROOT)}
        *first, last = c.etcd
        # Members start one after another, but none is healthy before a quorum runs: the
        # earlier ones count as started once they listen for their peers.
        return [
            *(Daemon(m.process, ns, TIER_CONTROL_PLANE, self._etcd_argv(c, m),
                     partial(self._etcd_listening, ns, m)) for m in first),
            Daemon(last.process, ns, TIER_CONTROL_PLANE, self._etcd_argv(c, last),
                   lambda: self.etcd_healthy(ns, c), after=lambda: self._etcd_auth(c)),
            Daemon(f"apiserver-{c.name}", ns, TIER_CONTROL_PLANE, self._apiserver_argv(c),
                   lambda: self._apiserver_synced(c), env=py),
            Daemon(f"remote-endpoint-{c.name}", ns, TIER_CONTROL_PLANE,
                   self._remote_endpoint_argv(c), lambda: self._remote_endpoint_ready(c), env=py),
            *([Daemon(f"kvstoremesh-{c.name}", ns, TIER_CONTROL_PLANE, self._kvstoremesh_argv(c),
                      lambda: self.kvstoremesh_status(c) is not None, env=py)]
              if self.kvstoremesh else []),
        ]

    def node_daemons(self, n: Node) -> list[Daemon]:
        """The processes of one node, in start order."""
        conf = self.node_dir(n) / "agent.yaml"
        return [
            Daemon(f"agent-{n.key}", n.host.netns, TIER_NODE, self._agent_argv(n),
                   lambda: self._agent_ready(n), files={conf: self.agent_config(n)},
                   env={"PYTHONPATH": str(REPO_ROOT)}),
        ]

    def start(self, *names: str) -> None:
        """Start these recorded daemons again where they do not run, each awaited, nothing
        else touched (bring back one etcd member of several, for instance)."""
        state = self._own_state()
        daemons = {d.name: d for group in [self.router_daemons(),
                                           *(self.external_daemons(h) for h in self.topo.external),
                                           *(self.control_plane(c) for c in self.topo.clusters),
                                           *(self.relay_daemons(c) for c in self.topo.clusters),
                                           *(self.node_daemons(n) for n in self.topo.nodes()),
                                           *(self.vm_daemons(vm) for vm in self.topo.vms)]
                   for d in group}
        unknown = [n for n in names if n not in daemons]
        if unknown:
            raise LabError(f"no lab daemon {', '.join(unknown)} (known: {', '.join(daemons)})")
        self._ensure_all(state, [[daemons[n]] for n in names])

    def _ensure_all(self, state: State, groups: list[list[Daemon]]) -> None:
        """Each group (a cluster's or a node's daemons) starts in order; the groups side by side."""
        for step in range(max((len(g) for g in groups), default=0)):
            batch = [g[step] for g in groups if step < len(g)]
            procs = [self._launch(state, d) for d in batch]
            for d, proc in zip(batch, procs, strict=True):
                self._await(d, proc)

    def _launch(self, state: State, d: Daemon) -> Process:
        """Start `d` unless its recorded PID still runs; apply changed files."""
        changed = [path for path, text in d.files.items() if _write_if_changed(path, text)]
        proc = state.processes.get(d.name)
        running = proc is not None and ops.alive(proc.pid, proc.marker)
        if proc is not None and running and changed:
            if d.reload is not None:
                self.say(f"  {d.name}: config changed, reloading")
                d.reload()
            else:
                self.say(f"  {d.name}: config changed, restarting (pid {proc.pid})")
                ops.stop(proc.pid, proc.marker)
                running = False
        if proc is not None and running:
            self.say(f"  {d.name}: running (pid {proc.pid})")
            return proc
        log = self.root / "logs" / f"{d.name}.log"
        pid = ops.spawn(d.netns, d.argv, log, d.env)
        proc = Process(d.name, d.netns, pid, str(self.root), str(log), d.tier)
        state.processes[d.name] = proc
        state.save(self.state_path)
        self.say(f"  {d.name}: started in {d.netns} (pid {pid}, log {log})")
        return proc

    def _await(self, d: Daemon, proc: Process) -> None:
        t0 = time.monotonic()

        def ok() -> bool:
            if not ops.alive(proc.pid, proc.marker):
                tail = Path(proc.log).read_text(errors="replace")[-1500:] if Path(proc.log).exists() else ""
                raise LabError(f"{d.name} exited; last log lines:\n{tail}")
            return d.ready()

        ops.wait_for(ok, d.timeout, f"{d.name} to be ready")
        if d.after is not None:
            d.after()
        self.say(f"  {d.name}: ready ({time.monotonic() - t0:.1f}s)")

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
        for c in self.topo.clusters:  # the etcd members after the first have addresses of their own
            if c.control_plane == host:
                for m in c.etcd[1:]:
                    ops.run("ip", "-n", host.netns, "addr", "replace",
                            f"{m.ip}/{host.segment.prefixlen}", "dev", "eth0")
        ops.run("ip", "-n", host.netns, "route", "replace", "default", "via", host.segment.gateway)
        if host.role == "node":
            ops.sysctl(host.netns, "net.ipv4.ip_forward", "1")

    # ---- BIRD -----------------------------------------------------------------------
    def bird_socket(self) -> Path:
        return self.root / "router" / "bird.ctl"

    @staticmethod
    def bgp_protocol(n: Node) -> str:
        return f"node_{n.cluster}_{n.name}"

    def bird_config(self) -> str:
        """One eBGP session per node; what the nodes announce goes into the router's table."""
        seg = self.topo.segments[0]
        sessions = "\n".join(
            f"protocol bgp {self.bgp_protocol(n)} {{\n"
            f"  local {n.host.segment.gateway} as {ROUTER_ASN};\n"
            f"  neighbor {n.host.ip} as {n.asn};\n"
            f"  hold time 9; keepalive time 3; connect retry time 1;\n"
            # a node back after its session failed is peered again within seconds (BIRD's
            # default waits 60 s after a failure, doubling up to 300 s)
            f"  error wait time 1, 5;\n"
            f"  graceful restart on;\n"
            f"  ipv4 {{ import all; export none; }};\n}}"
            for n in self.topo.nodes())
        return f"""# Written by plexus lab: the datacenter router. Pod CIDRs come from BGP alone.
router id {seg.gateway};
protocol device {{ }}
protocol direct {{ ipv4; }}
protocol kernel {{
  ipv4 {{ export where source != RTS_DEVICE; }};
}}
{sessions}
"""

    def bgp_manifests(self, c: Cluster) -> str:
        """What a cluster applies so its nodes peer with the router and announce pod CIDRs."""
        docs = [{
            "apiVersion": "plexus.io/v1", "kind": "BGPClusterConfig",
            "metadata": {"name": "lab-router"},
            "spec": {"nodeSelector": {}, "bgpInstances": [{
                "name": "lab", "localASN": c.nodes[0].asn,
                "peers": [{"name": "router", "peerAddress": c.segment.gateway,
                           "peerASN": ROUTER_ASN, "peerConfigRef": {"name": "router"}}]}]}},
            {"apiVersion": "plexus.io/v1", "kind": "BGPPeerConfig", "metadata": {"name": "router"},
             "spec": {"timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3},
                      "gracefulRestart": {"enabled": True, "restartTimeSeconds": 120},
                      "families": [{"afi": "ipv4", "safi": "unicast",
                                    "advertisements": {"matchLabels": {"advertise": "lab"}}}]}},
            {"apiVersion": "plexus.io/v1", "kind": "BGPAdvertisement",
             "metadata": {"name": "pods", "labels": {"advertise": "lab"}},
             "spec": {"advertisements": [
                 {"advertisementType": "PodCIDR"},
                 {"advertisementType": "Service", "service": {"addresses": ["ClusterIP"]},
                  "selector": {"matchLabels": {}}},
                 {"advertisementType": "EgressGateway"}]}}]
        return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)

    def _apply_bgp(self) -> None:
        for c in self.topo.clusters:
            path = self.root / "clusters" / c.name / "bgp.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.bgp_manifests(c))
            r = subprocess.run([sys.executable, "-m", "plexus", "apply", "-f", str(path), "--lab",
                                c.name], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
            if r.returncode != 0:
                raise LabError(f"applying the BGP configuration of {c.name} failed: {r.stderr}")

    def _bgp_routes_in(self) -> bool:
        """Every session is up and every pod CIDR learned over it: a route kept from a
        session that is down (graceful restart) does not count."""
        established = {line.split()[0] for line in self.birdc("show", "protocols").splitlines()
                       if line.split()[1:2] == ["BGP"] and line.rstrip().endswith("Established")}
        routes = self.birdc("show", "route")
        return all(self.bgp_protocol(n) in established and f"{n.pod_cidr}" in routes
                   and self.bgp_protocol(n) in routes for n in self.topo.nodes())

    def birdc(self, *args: str) -> str:
        return ops.run("birdc", "-s", str(self.bird_socket()), *args, check=False).stdout

    def _bird_ready(self) -> bool:
        return "Daemon is up and running" in self.birdc("show", "status")

    def _bird_reload(self) -> None:
        out = self.birdc("configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise LabError(f"BIRD rejected its new config: {out.strip()}")

    # ---- etcd -----------------------------------------------------------------------
    def pki(self, cluster: str) -> Path:
        return self.root / "pki" / cluster

    def _cluster_pki(self, c: Cluster) -> None:
        """The server certificate names every member's address; one made for fewer members
        is made again (its CA, and so every client certificate, stays)."""
        pki = self.pki(c.name)
        ips = [m.ip for m in c.etcd]
        server = pki / "server.crt"
        if server.exists():
            sans = x509.load_pem_x509_certificate(server.read_bytes()).extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
            if not {str(ip) for ip in sans} >= {*ips, "127.0.0.1"}:
                server.unlink()
                (pki / "server.key").unlink(missing_ok=True)
        # other clusters reach the read-only endpoint, which answers on every member's address
        make_cluster_pki(c.name, pki, [*ips, "127.0.0.1"], advertise=ips)
        make_flows_pki(c.name, pki, {n.name: n.host.ip for n in c.nodes})

    def etcd_data(self, c: Cluster, m: EtcdMember) -> Path:
        d = self.root / "clusters" / c.name
        return d / "etcd" if len(c.etcd) == 1 else d / m.process

    def _etcd_argv(self, c: Cluster, m: EtcdMember) -> list[str]:
        data = self.etcd_data(c, m)
        data.parent.mkdir(parents=True, exist_ok=True)
        tls = etcd_tls_args(self.pki(c.name))
        if len(c.etcd) == 1:  # peers on loopback: nobody else to talk to
            peers = ["--listen-peer-urls", "http://127.0.0.1:2380",
                     "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                     "--initial-cluster", f"{m.name}=http://127.0.0.1:2380"]
        else:
            pki = self.pki(c.name)
            peers = ["--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                     "--initial-cluster", ",".join(f"{o.name}={o.peer_url}" for o in c.etcd),
                     "--initial-cluster-state", "new", "--initial-cluster-token", f"plexus-{c.name}",
                     "--peer-cert-file", str(pki / "server.crt"), "--peer-key-file", str(pki / "server.key"),
                     "--peer-trusted-ca-file", str(pki / "ca.crt"), "--peer-client-cert-auth"]
        # The first member also answers on loopback, where `plexus apply --lab` looks.
        local = ",https://127.0.0.1:2379" if m == c.etcd[0] else ""
        return ["etcd", "--name", m.name, "--data-dir", str(data),
                "--listen-client-urls", f"{m.url}{local}", "--advertise-client-urls", m.url,
                *peers, *tls, "--logger", "zap", "--log-level", "warn"]

    def etcdctl(self, ns: str, c: Cluster, *args: str, url: str | None = None,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        """etcdctl as the cluster's admin against `url`, or every member."""
        return ops.run("etcdctl", "--endpoints", url or ",".join(c.etcd_urls), "--dial-timeout", "2s",
                       *etcdctl_tls(self.pki(c.name)), *args, ns=ns, check=check)

    def etcd_healthy(self, ns: str, c: Cluster) -> bool:
        """Every member answers from `ns` and commits (a quorum read)."""
        return self.etcdctl(ns, c, "endpoint", "health").returncode == 0

    def _etcd_listening(self, ns: str, m: EtcdMember) -> bool:
        return f"{m.ip}:2380 " in ops.run("ss", "-Hltn", ns=ns, check=False).stdout

    def etcd_members_status(self, c: Cluster) -> list[dict[str, Any]]:
        """Per member: endpoint, PID, alive, and its role as it says itself."""
        state = State.load(self.state_path)
        r = self.etcdctl(c.control_plane.netns, c, "endpoint", "status", "-w", "json")
        said: dict[str, dict[str, Any]] = {}
        try:
            said = {e["Endpoint"]: e["Status"] for e in json.loads(r.stdout or "[]")}
        except (ValueError, KeyError, TypeError):
            pass
        out = []
        for m in c.etcd:
            proc = state.processes.get(m.process)
            st = said.get(m.url)
            role = "down"
            if st is not None:
                leader = st.get("leader", 0)
                role = ("no leader" if not leader else
                        "leader" if leader == st.get("header", {}).get("member_id") else "follower")
            out.append({"name": m.name, "endpoint": m.url, "pid": proc.pid if proc else None,
                        "alive": bool(proc and ops.alive(proc.pid, proc.marker)), "role": role,
                        "revision": st.get("header", {}).get("revision") if st else None})
        return out

    def _etcd_auth(self, c: Cluster) -> None:
        marker = self.root / "clusters" / c.name / "auth-enabled"
        if marker.exists():
            return
        for cmd in etcd_auth_commands(c.name):
            self.etcdctl(c.control_plane.netns, c, *cmd, check=True)
        marker.write_text("users root and remote, roles root and remote\n")

    def _remote_endpoint_argv(self, c: Cluster) -> list[str]:
        """Other clusters read this cluster's etcd only through this read-only endpoint."""
        # on every member's address: the namespace is the lab's own control plane
        return [sys.executable, "-m", "plexus", "clustermesh", "remote-endpoint",
                "--pki", str(self.pki(c.name)), "--listen", f"0.0.0.0:{REMOTE_PORT}",
                *(f for url in (["https://127.0.0.1:2379"] if len(c.etcd) == 1 else c.etcd_urls)
                  for f in ("--etcd", url))]

    def _remote_endpoint_ready(self, c: Cluster) -> bool:
        pki = self.pki(c.name)
        return ops.run("etcdctl", "--endpoints", f"https://{c.control_plane.ip}:{REMOTE_PORT}",
                       "--dial-timeout", "2s", "--cacert", str(pki / "ca.crt"),
                       "--cert", str(pki / "remote.crt"), "--key", str(pki / "remote.key"),
                       "endpoint", "status", ns=c.control_plane.netns, check=False).returncode == 0

    def _apiserver_argv(self, c: Cluster) -> list[str]:
        pki = self.pki(c.name)
        return [sys.executable, "-m", "plexus", "clustermesh-apiserver", "--cluster-name", c.name,
                "--cluster-id", str(c.id),
                *(f for url in (["https://127.0.0.1:2379"] if len(c.etcd) == 1 else c.etcd_urls)
                  for f in ("--etcd", url)),
                "--cacert", str(pki / "ca.crt"), "--cert", str(pki / "admin.crt"),
                "--key", str(pki / "admin.key"), "--identity-gc-grace", "60", "--vm-pki", str(pki),
                "--api-socket", str(self.apiserver_socket(c)),
                "--metrics-address", c.control_plane.ip, "--metrics-port", str(APISERVER_METRICS_PORT)]

    def apiserver_socket(self, c: Cluster) -> Path:
        """The clustermesh-apiserver's API socket (`plexus clustermesh-apiserver status`)."""
        return (lab_apiserver_socket(c.name) if self.root == LAB_DIR
                else self.root / "clusters" / c.name / "apiserver.sock")

    def _apiserver_synced(self, c: Cluster) -> bool:
        r = self.etcdctl(c.control_plane.netns, c, "get", "--prefix", "--keys-only",
                         f"cilium/synced/{c.name}/")
        return r.returncode == 0 and r.stdout.count("cilium/synced/") >= 4

    # ---- kvstoremesh ---------------------------------------------------------------
    def kvstoremesh_dir(self, c: Cluster) -> Path:
        return self.root / "clusters" / c.name / "kvstoremesh"

    def kvstoremesh_socket(self, c: Cluster) -> Path:
        return self.kvstoremesh_dir(c) / "kvstoremesh.sock"

    def _kvstoremesh_argv(self, c: Cluster) -> list[str]:
        pki = self.pki(c.name)
        (self.kvstoremesh_dir(c) / "clustermesh").mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "plexus", "kvstoremesh", "--cluster-name", c.name,
                "--cluster-id", str(c.id),
                *(f for url in (["https://127.0.0.1:2379"] if len(c.etcd) == 1 else c.etcd_urls)
                  for f in ("--etcd", url)),
                "--cacert", str(pki / "ca.crt"), "--cert", str(pki / "admin.crt"),
                "--key", str(pki / "admin.key"),
                "--config-dir", str(self.kvstoremesh_dir(c) / "clustermesh"),
                "--api-socket", str(self.kvstoremesh_socket(c)),
                "--metrics-address", c.control_plane.ip,
                "--metrics-port", str(KVSTOREMESH_METRICS_PORT)]

    def kvstoremesh_status(self, c: Cluster) -> dict[str, Any] | None:
        """What `plexus kvstoremesh status` shows, or None while it does not answer."""
        try:
            return dict(Client(self.kvstoremesh_socket(c), timeout=2).get("/v1/status"))
        except ClientError:
            return None

    def _connect_clusters(self) -> None:
        """Each cluster gets the files that reach the others: into its agents' config dirs
        (direct) or its kvstoremesh's, whose agents then only need each remote's name."""
        clusters = self.topo.clusters
        if self.kvstoremesh:
            dirs = {c.name: [self.kvstoremesh_dir(c) / "clustermesh", self.relay_dir(c) / "clustermesh"]
                    for c in clusters}
            for c in clusters:
                for n in c.nodes:
                    for other in clusters:
                        if other != c:
                            _write_if_changed(self.node_dir(n) / "clustermesh" / other.name, "")
        else:
            dirs = {c.name: [*(self.node_dir(n) / "clustermesh" for n in c.nodes),
                             self.relay_dir(c) / "clustermesh"] for c in clusters}
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

    # ---- relays ---------------------------------------------------------------------
    def relay_dir(self, c: Cluster) -> Path:
        return self.root / "clusters" / c.name / "relay"

    def relay_socket(self, c: Cluster) -> Path:
        return lab_relay_socket(c.name) if self.root == LAB_DIR else self.relay_dir(c) / "relay.sock"

    def relay_config(self, c: Cluster) -> str:
        """The relay next to `c`'s control plane: its etcd for the node table, the remote
        clusters' files, and credentials every cluster's CA issued for its nodes."""
        pki = self.pki(c.name)
        (self.relay_dir(c) / "clustermesh").mkdir(parents=True, exist_ok=True)
        cfg = {
            "cluster": {"name": c.name, "id": c.id},
            "etcd": {"endpoints": c.etcd_urls, "trustedCaFile": str(pki / "ca.crt"),
                     "certFile": str(pki / "admin.crt"), "keyFile": str(pki / "admin.key")},
            "clustermeshDir": str(self.relay_dir(c) / "clustermesh"),
            "apiSocket": str(self.relay_socket(c)),
            "listen": {"address": "127.0.0.1", "port": RELAY_PORT},
            "metrics": {"address": c.control_plane.ip, "port": 9964},
            "relay": {"nodePort": FLOWS_PORT,
                      "nodeTls": {k.name: {"caFile": str(self.pki(k.name) / "ca.crt"),
                                           "certFile": str(self.pki(k.name) / "relay.crt"),
                                           "keyFile": str(self.pki(k.name) / "relay.key")}
                                  for k in self.topo.clusters}},
        }
        head = f"# Written by plexus lab for cluster {c.name}'s relay.\n"
        return head + yaml.safe_dump(cfg, sort_keys=False)

    def relay_daemons(self, c: Cluster) -> list[Daemon]:
        conf = self.relay_dir(c) / "relay.yaml"
        return [Daemon(f"relay-{c.name}", c.control_plane.netns, TIER_CONTROL_PLANE,
                       [sys.executable, "-m", "plexus", "relay", "--config", str(conf)],
                       lambda: self._relay_ready(c), files={conf: self.relay_config(c)},
                       env={"PYTHONPATH": str(REPO_ROOT)})]

    def _relay_ready(self, c: Cluster) -> bool:
        try:
            Client(self.relay_socket(c), timeout=2).get("/v1/relay/status")
            return True
        except ClientError:
            return False

    # ---- agents ---------------------------------------------------------------------
    def agent_config(self, n: Node) -> str:
        """The agent's YAML; a feature adds its section to `sections`."""
        c = self.topo.cluster(n.cluster)
        d = self.node_dir(n)
        (d / "clustermesh").mkdir(parents=True, exist_ok=True)
        pki = self.pki(c.name)
        sections: dict[str, Any] = {
            "cluster": {"name": c.name, "id": c.id},
            "node": {"name": n.name, "ip": n.host.ip, "podCIDR": n.pod_cidr},
            "stateDir": str(d / "state"),
            "apiSocket": str(self.socket(n)),
            "metrics": {"address": n.host.ip, "port": 9962},
            "clustermesh": {
                "etcd": {"endpoints": c.etcd_urls, "trustedCaFile": str(pki / "ca.crt"),
                         "certFile": str(pki / "admin.crt"), "keyFile": str(pki / "admin.key")},
                "configDir": str(d / "clustermesh"),
                **({"mode": "kvstoremesh"} if self.kvstoremesh else {}),
            },
            "encryption": {"enabled": True, "device": n.wg_device, "strict": True},
            "bpf": {"enabled": True, "pinDir": str(self.bpffs / n.key),
                    "flowsServer": {"address": n.host.ip, "port": FLOWS_PORT, "caFile": str(pki / "ca.crt"),
                                    "certFile": str(pki / f"flows-{n.name}.crt"),
                                    "keyFile": str(pki / f"flows-{n.name}.key")}},
        }
        return f"# Written by plexus lab for node {n.key}.\n" + yaml.safe_dump(sections, sort_keys=False)

    @staticmethod
    def wg_device(n: Node) -> str:
        return n.wg_device

    def _agent_argv(self, n: Node) -> list[str]:
        return [sys.executable, "-m", "plexus", "agent", "--config",
                str(self.node_dir(n) / "agent.yaml")]

    def _agent_ready(self, n: Node) -> bool:
        try:
            Client(self.socket(n), timeout=2).get("/v1/status")
            return True
        except ClientError:
            return False

    # ---- VMs ------------------------------------------------------------------------
    def vm_cluster(self, _vm: Host) -> Cluster:
        return self.topo.clusters[0]

    @staticmethod
    def vm_name(vm: Host) -> str:
        return vm.netns.removeprefix("plx-")

    def vm_dir(self, vm: Host) -> Path:
        return self.root / "vms" / self.vm_name(vm)

    def vm_socket(self, vm: Host) -> Path:
        return self.vm_dir(vm) / "agent.sock"

    @staticmethod
    def vm_wg_device(vm: Host) -> str:
        return f"plxwg-{vm.netns.removeprefix('plx-')}"

    def vm_daemons(self, vm: Host) -> list[Daemon]:
        return [Daemon(f"vmagent-{self.vm_name(vm)}", vm.netns, TIER_NODE,
                       [sys.executable, "-m", "plexus", "vmagent", "--config",
                        str(self.vm_dir(vm) / "vmagent.yaml")],
                       lambda: self.vm_joined(vm), env={"PYTHONPATH": str(REPO_ROOT)})]

    def vm_create_argv(self, vm: Host, bundle: Path) -> list[str]:
        """`plexus vm create` as the cluster's admin, run inside its control-plane namespace."""
        c = self.vm_cluster(vm)
        return [sys.executable, "-m", "plexus", "vm", "create", self.vm_name(vm),
                "--cluster", c.name, "--ip", vm.ip, "--labels", VM_LABELS,
                "--lease", str(VM_LEASE), "-o", str(bundle),
                "--etcd", "https://127.0.0.1:2379" if len(c.etcd) == 1 else c.etcd_urls[0],
                "--pki", str(self.pki(c.name)), "--mesh-pki", str(self.root / "pki"),
                *(f for url in c.etcd_urls for f in ("--advertise", url))]

    def _enrol_vm(self, vm: Host) -> None:
        """Enrol and unpack the bundle as `plexus vm join` does, once: the VM's agent renews
        its certificate in place, which unpacking again would undo."""
        from vmagent.bundle import load_bundle
        from vmagent.join import unpack

        d = self.vm_dir(vm)
        bundle = d / "bundle.yaml"
        if (d / "vmagent.yaml").exists():
            return
        if not bundle.exists():
            d.mkdir(parents=True, exist_ok=True)
            c = self.vm_cluster(vm)
            r = subprocess.run(["ip", "netns", "exec", c.control_plane.netns,
                                *self.vm_create_argv(vm, bundle)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
            if r.returncode != 0:
                raise LabError(f"enrolling {vm.netns} in {c.name} failed: {r.stderr.strip()}")
            self.say(f"  {r.stdout.strip()}")
        unpack(load_bundle(bundle, name=self.vm_name(vm)), d, self.vm_socket(vm),
               self.vm_wg_device(vm), encryption=True, bpf_pin_dir=self.bpffs / self.vm_name(vm),
               strict=True)

    def vm_join(self, name: str | None = None) -> float:
        """Enrol the lab's VM (or the one named) where it is not, start its agent where it
        does not run, and wait until every node of every cluster knows it; returns the seconds
        that took. The rest of the lab must be up."""
        started = time.monotonic()
        vms = [vm for vm in self.topo.vms if name in (None, self.vm_name(vm), vm.netns)]
        if not vms:
            raise LabError(f"no lab VM {name!r}: the lab has "
                           + ", ".join(self.vm_name(vm) for vm in self.topo.vms))
        if ROUTER not in ops.namespaces():
            raise LabError("the lab is down: `plexus lab up` first")
        state = self._own_state()
        for vm in vms:
            self.say(f"==> VM {vm.netns} ({vm.ip}) joins {self.vm_cluster(vm).name}")
            self._enrol_vm(vm)
        self._ensure_all(state, [self.vm_daemons(vm) for vm in vms])
        ops.wait_for(self._vms_in_mesh, 60, "every node of every cluster to know the VMs",
                     interval=0.1)
        return time.monotonic() - started

    def vm_joined(self, vm: Host) -> bool:
        try:
            return bool(Client(self.vm_socket(vm), timeout=2).get("/v1/vm")["state"] == "joined")
        except ClientError:
            return False

    def _vms_in_mesh(self) -> bool:
        want = {vm.ip for vm in self.topo.vms}
        for n in self.topo.nodes():
            try:
                rows = Client(self.socket(n), timeout=3).get("/v1/clustermesh/tables/endpoints")
            except ClientError:
                return False
            if not want <= {r.get("ip") for r in rows}:
                return False
        return True

    # ---- pods -----------------------------------------------------------------------
    def pod_add(self, cluster: str, node_name: str, pod: str, labels: dict[str, str],
                namespace: str = "default") -> dict[str, Any]:
        if not POD_NAME_RE.match(pod):
            raise LabError(f"pod name {pod!r} must be lower-case alphanumerics and '-', "
                           "at most 22 characters")
        node = self.topo.node(cluster, node_name)
        self._node_up(node)
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
        self._node_up(node)
        try:
            call_plugin("DEL", container_id=f"lab-{node.key}-{pod}", netns=f"/var/run/netns/{ns}",
                        host_netns=node.host.netns,
                        config=self._cni_config(node, info.get("labels", {})))
        except CniError as e:
            raise LabError(f"CNI DEL for {pod} on {node.key} failed: {e}") from None
        finally:
            ops.delete_netns(ns)
            state.pods.pop(ns, None)
            state.save(self.state_path)

    def _node_up(self, node: Node) -> None:
        if node.host.netns not in ops.namespaces() or not self._agent_ready(node):
            raise LabError(f"node {node.key} is not running: `plexus lab up` first")

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
            "etcd": {c.name: self.etcd_members_status(c) for c in self.topo.clusters
                     if c.control_plane.netns in present},
            "pods": state.pods,
            "vms": {self.vm_name(vm): self._vm_status(vm) for vm in self.topo.vms},
            "meshMode": self.mesh_mode,
            "kvstoremesh": ({c.name: self.kvstoremesh_status(c) or {"error": "not answering"}
                             for c in self.topo.clusters} if self.kvstoremesh else {}),
            "router_routes": self.birdc("show", "route") if ROUTER in present else "",
            "router_protocols": self.birdc("show", "protocols") if ROUTER in present else "",
        }

    def _vm_status(self, vm: Host) -> dict[str, Any]:
        try:
            return dict(Client(self.vm_socket(vm), timeout=3).get("/v1/vm"))
        except ClientError as e:
            return {"error": str(e)}

    # ---- down -----------------------------------------------------------------------
    def down(self, force: bool = False) -> list[str]:
        done: list[str] = []
        state = State.load(self.state_path)
        if state.repo != str(REPO_ROOT) and state.alive() and not force:
            raise LabError(f"the lab is up from {state.repo}; use that checkout's `plexus lab down` "
                           "(or --force)")
        # Agents first, then the control planes, then the router; each tier together.
        for tier in sorted({p.tier for p in state.processes.values()}, reverse=True):
            procs = [p for p in state.processes.values() if p.tier == tier and ops.alive(p.pid, p.marker)]
            # What they started (wireguard-go under an agent) is ours too; stop it after them.
            below = ops.descendants(p.pid for p in procs)
            ops.stop_all([(p.pid, partial(ops.alive, p.pid, p.marker)) for p in procs])
            done += [f"stopped {p.name} (pid {p.pid})" for p in procs]
            left = [(pid, ops.cmdline(pid).strip()) for pid, t in below if ops.still_running(pid, t)]
            ops.stop_all([(pid, partial(ops.still_running, pid, t)) for pid, t in below])
            done += [f"stopped {cmd} (pid {pid}, started by the lab)" for pid, cmd in left]
        # wireguard-go outlives its agent by design (stop is not remove), and one started by an
        # earlier agent is no longer below the current one: its pid file names it.
        for _netns, state_dir, device in self.wireguard_devices():
            pid_file = state_dir / "wireguard-go.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().strip() or 0)
                if pid and ops.alive(pid, device):
                    ops.stop(pid, device)
                    done.append(f"stopped wireguard-go {device} (pid {pid})")
        for ns in sorted(ops.namespaces()):
            if is_lab_netns(ns, self.topo):
                ops.delete_netns(ns)
                done.append(f"deleted netns {ns}")
        if BPF_DIR.exists():
            shutil.rmtree(BPF_DIR, ignore_errors=True)
            done.append(f"removed {BPF_DIR}")
        for device in [n.wg_device for n in self.topo.nodes()] + [self.vm_wg_device(vm)
                                                                  for vm in self.topo.vms]:
            sock = WG_DIR / f"{device}.sock"
            if sock.exists():
                sock.unlink()
                done.append(f"removed {sock}")
        if os.path.ismount(self.bpffs):
            ops.run("umount", str(self.bpffs), check=False)
            done.append(f"unmounted {self.bpffs} (pinned maps gone)")
        if self.root.exists():
            shutil.rmtree(self.root)
            done.append(f"removed {self.root}")
        return done


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True

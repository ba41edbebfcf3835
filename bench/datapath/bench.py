"""Datapath benchmarks: pod-to-pod traffic through the eBPF datapath next to the same allow
list in iptables and in nftables sets, and the ipcache map's reconcile rate.

    .venv/bin/python -m bench.datapath.bench [--only traffic|reconcile] [--rounds 5] [--seconds 5]
        [--pings 200] [--packets both|gso|1500] [--entries 100000] [--changes 1000]

The package takes the machine lock itself (bench/__init__.py): do not wrap the command in
`flock /run/plexus-tests.lock`, which would wait on itself.

traffic: pod1 -> node1 -> node2 -> pod2, four network namespaces joined by veths, routed.
Every round measures, in turn (the order rotates from round to round), iperf3 TCP and ping
from pod1 to pod2 with:
  none      no filter;
  tc-noop   a program that returns "pass" at once, attached where the datapath goes: what
            tc and a BPF call cost before the datapath does anything;
  ebpf      Plexus's datapath on both pods' host veths. Per node, a process inside the node's
            namespace loads bpf/programs/datapath.c with bpf/loader.py and fills its pinned
            maps through the agent's reconcilers and Ops (IpcacheOps, PolicyOps, EnforceOps,
            AttachOps), as bpf/module.py does: 10,000 identities in the ipcache, and the
            policy entries the policy engine (bpf/policy.py) computes from 100 rules;
  iptables  the same allow list as one rule per policy entry (10,000) in a chain on FORWARD of
            both nodes, the test flow's rule last;
  nftables  the same allow list as two sets (address pair and port; address pair) looked up
            from a forward chain of both nodes.
`--packets` runs it with the kernel's segmentation offload (64 KB packets through the path),
with 1500-byte packets (`ethtool -K eth0 tso off gso off` in both pods), or both.

reconcile: 100,000 ipcache entries into an empty pinned map through Reconciler + IpcacheOps,
one row per operation and in batches; then single changes one at a time, each waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine, percentile
from bpf.models import PlexusNetworkPolicy
from bpf.policy import EGRESS, LocalEndpoint, PolicyEntry, compute
from clustermesh.models import ID_HOST, LABEL_CLUSTER, LABEL_NAMESPACE
from plexus.core.config import parse
from tests.support import sh, stop_pid, unique

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "plx-bd-"
CASES = ("none", "tc-noop", "ebpf", "iptables", "nftables")
FILTERS = ("ebpf", "iptables", "nftables")  # the ones that enforce the policy
POD1, POD2 = "10.211.1.10", "10.211.2.10"
STRANGER = "10.211.1.11"  # a second address of pod1's that no ipcache entry names: world
GW1, GW2 = "10.211.1.1", "10.211.2.1"
NODE1, NODE2 = "192.168.211.1", "192.168.211.2"
HOST_VETH = ("lxcbench1", "lxcbench2")  # the pods' host-side veths, in node1 and node2
IPERF_PORT = 5201
NAMESPACE, CLUSTER = "bench", "east"

# One node's agent, run with `ip netns exec <node> python -c` so that its netlink and tc calls
# happen in that node, as the agent's would. It imports bpf and plexus.core only (importing
# the bench package would take the machine lock its parent holds). Commands on stdin: attach,
# attach-noop, detach, counters, quit; every answer is one JSON line.
NODE_AGENT = r"""
import asyncio, json, sys, threading, time
from pathlib import Path
from bcc import BPF
from bpf import attach
from bpf.loader import Datapath, prog_id
from bpf.ops import Attachment, AttachOps, EnforceOps, Ifindexes, IpcacheEntry, IpcacheOps, PolicyOps
from bpf.policy import Enforced, PolicyEntry
from plexus.core.reconciler import Reconciler
from plexus.core.tables import Table

spec = json.loads(Path(sys.argv[1]).read_text())
ifname = spec["ifname"]


async def load():
    t0 = time.perf_counter()
    dp = await asyncio.to_thread(Datapath, Path(spec["pin_dir"]))
    compiled = time.perf_counter() - t0
    ifx = Ifindexes()
    attachments = Table("bpf-attach", key=lambda a: a.key)
    ipcache = Table("bpf-ipcache", key=lambda e: e.key)
    entries = Table("bpf-policy", key=lambda e: e.key)
    enforced = Table("bpf-enforce", key=lambda e: e.key)
    recs = [Reconciler("bpf-attach", attachments, AttachOps(dp, ifx)),
            Reconciler("bpf-ipcache", ipcache, IpcacheOps(dp)),
            Reconciler("bpf-policy", entries, PolicyOps(dp, ifx)),
            Reconciler("bpf-enforce", enforced, EnforceOps(dp, ifx))]
    tasks = [asyncio.create_task(r.run()) for r in recs]
    t1 = time.perf_counter()
    attachments.upsert(Attachment(ifname))
    ipcache.replace_where(lambda _r: True, [IpcacheEntry(*r) for r in spec["ipcache"]])
    entries.replace_where(lambda _r: True, [PolicyEntry(*e) for e in spec["policy"]])
    enforced.replace_where(lambda _r: True, [Enforced(*e) for e in spec["enforce"]])
    while not all(len(r.applied) == len(r.table) and r.settled() for r in recs):
        for r in recs:
            if r.errors():
                raise SystemExit(f"{r.name}: {list(r.errors().items())[:3]}")
        await asyncio.sleep(0.02)
    filled = time.perf_counter() - t1
    for t in tasks:
        t.cancel()
    return dp, compiled, filled


dp, compiled, filled = asyncio.run(load())
noop_bpf = BPF(text=b"#include <uapi/linux/pkt_cls.h>\nint noop(struct __sk_buff *skb) { return TC_ACT_OK; }",
               cflags=["-w"])
noop = noop_bpf.load_func(b"noop", BPF.SCHED_CLS)
# the agent follows the flow events; so do we, with nobody listening
dp.open_flows(lambda ev: None)
threading.Thread(target=lambda: [dp.poll_flows(200) for _ in iter(int, 1)], daemon=True).start()
attach.detach(ifname)
print(json.dumps({"compiled": compiled, "filled": filled, "ipcache": len(dp.ipcache_items()),
                  "policy": len(dp.policy_items()), "enforce": dp.enforce_items()}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "attach":
        attach.attach(ifname, (dp.from_pod.fd, dp.from_pod.name), (dp.to_pod.fd, dp.to_pod.name))
        print("{}", flush=True)
    elif cmd == "attach-noop":
        attach.attach(ifname, (noop.fd, noop.name), (noop.fd, noop.name))
        print("{}", flush=True)
    elif cmd == "detach":
        attach.detach(ifname)
        print("{}", flush=True)
    elif cmd == "counters":
        print(json.dumps(dp.counter_totals()), flush=True)
    elif cmd == "prog-ids":
        ids = {f.name.decode(): prog_id(f.fd) for f in (dp.from_pod, dp.to_pod, noop)}
        print(json.dumps(ids), flush=True)
    else:
        break
"""


# ---- the workload: identities, policies, and the map contents they make ------------------------
@dataclass
class Workload:
    """10,000 identities, one /32 each; 100 rules per policy; pod1 and pod2 two of the identities."""

    identities: int
    rules: int
    addr: dict[int, str] = field(default_factory=dict)      # identity -> its address
    labels: dict[int, dict[str, str]] = field(default_factory=dict)
    entries: dict[int, list[PolicyEntry]] = field(default_factory=dict)   # node -> its pod's entries
    enforced: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    ids: tuple[int, int] = (0, 0)  # pod1's and pod2's identities

    def build(self) -> Workload:
        n = self.identities
        for i in range(n):
            ident = 100_000 + i
            group = i * self.rules // n  # contiguous blocks: the last block holds both pods
            app = {n - 2: "bench-client", n - 1: "bench-server"}.get(i, f"a{i}")
            self.addr[ident] = {n - 2: POD1, n - 1: POD2}.get(i, f"10.212.{i >> 8}.{i & 255}")
            self.labels[ident] = {LABEL_NAMESPACE: NAMESPACE, LABEL_CLUSTER: CLUSTER,
                                  "group": f"g{group}", "app": app}
        self.ids = (100_000 + n - 2, 100_000 + n - 1)
        for node, (app, ifname, section, peers) in enumerate(
                (("bench-client", HOST_VETH[0], "egress", "toEndpoints"),
                 ("bench-server", HOST_VETH[1], "ingress", "fromEndpoints"))):
            policy = parse(PlexusNetworkPolicy, self.policy(app, section, peers), f"bench {section}")
            ep = LocalEndpoint(ifname, (POD1, POD2)[node], self.labels[self.ids[node]])
            entries, enforced = compute([policy], self.labels, [ep])
            self.entries[node] = entries
            self.enforced[node] = [(e.ifname, e.direction) for e in enforced]
        return self

    def policy(self, app: str, section: str, peers: str) -> dict[str, Any]:
        """Rule r allows the identities of group r on TCP port 10000+r; the last rule, whose
        group holds both pods, allows any port and protocol."""
        rules: list[dict[str, Any]] = []
        for r in range(self.rules):
            rule: dict[str, Any] = {peers: [{"matchLabels": {"group": f"g{r}"}}]}
            if r < self.rules - 1:
                rule["toPorts"] = [{"ports": [{"port": 10_000 + r, "protocol": "TCP"}]}]
            rules.append(rule)
        return {"apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
                "metadata": {"name": f"bench-{section}", "namespace": NAMESPACE},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}}, section: rules}}

    def ipcache_rows(self) -> list[tuple[str, int, str, int]]:
        host = {self.ids[0]: NODE1, self.ids[1]: NODE2}
        return [(f"{a}/32", ident, host.get(ident, "192.168.212.1"), 0) for ident, a in self.addr.items()]

    def allow_list(self, node: int) -> list[tuple[str, str, int, int]]:
        """The node's pod's policy entries as (source, destination, proto, port), the test
        flow's last; the host entry, which no packet here uses, left out."""
        pod = (POD1, POD2)[node]
        out = []
        for e in self.entries[node]:
            if e.identity == ID_HOST:
                continue
            peer = self.addr[e.identity]
            src, dst = (pod, peer) if e.direction == EGRESS else (peer, pod)
            out.append((src, dst, e.proto, e.port))
        return sorted(out, key=lambda r: (POD1, POD2) == (r[0], r[1]))

    def describe(self) -> str:
        e = self.entries
        return (f"{self.identities:,} identities (one /32 each in the ipcache, {self.rules} groups of "
                f"{self.identities // self.rules}); pod1's egress and pod2's ingress each selected by a "
                f"policy of {self.rules} rules: rules 1-{self.rules - 1} allow one group each on its own "
                f"TCP port, rule {self.rules} allows the pods' group on any port -> "
                f"{len(e[0]):,} policy entries on pod1's veth (egress), {len(e[1]):,} on pod2's (ingress); "
                f"pod1's ingress and pod2's egress are not selected (allow all)")


# ---- the topology ---------------------------------------------------------------------------
class Topology:
    """pod1 -- node1 -- node2 -- pod2, with two node agents ready to attach the datapath."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.pod1, self.node1, self.node2, self.pod2 = (unique(PREFIX) for _ in range(4))
        self.namespaces = [self.pod1, self.node1, self.node2, self.pod2]
        self.nodes = (self.node1, self.node2)
        self.dir = Path(tempfile.mkdtemp(prefix="plexus-bench-dp-"))
        self.bpffs = self.dir / "bpffs"
        self.mounted = False
        self.agents: list[subprocess.Popen[str]] = []
        self.loaded: list[dict[str, Any]] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        for pod, node, host, addr, gw in ((self.pod1, self.node1, HOST_VETH[0], POD1, GW1),
                                          (self.pod2, self.node2, HOST_VETH[1], POD2, GW2)):
            sh("ip", "-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pod)
            sh("ip", "-n", pod, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", pod, "link", "set", "eth0", "up")
            sh("ip", "-n", pod, "route", "add", "default", "via", gw)
            if pod == self.pod1:
                sh("ip", "-n", pod, "addr", "add", f"{STRANGER}/24", "dev", "eth0")
            sh("ip", "-n", node, "addr", "add", f"{gw}/24", "dev", host)
            sh("ip", "-n", node, "link", "set", host, "up")
        sh("ip", "-n", self.node1, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
           "netns", self.node2)
        for node, me, other, remote in ((self.node1, NODE1, NODE2, "10.211.2.0/24"),
                                        (self.node2, NODE2, NODE1, "10.211.1.0/24")):
            sh("ip", "-n", node, "addr", "add", f"{me}/24", "dev", "eth1")
            sh("ip", "-n", node, "link", "set", "eth1", "up")
            sh("ip", "-n", node, "route", "add", remote, "via", other)
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=node)
        self.bpffs.mkdir()
        sh("mount", "-t", "bpf", "plx-bench-dp", str(self.bpffs))
        self.mounted = True
        rows = self.work.ipcache_rows()
        for i, node in enumerate(self.nodes):
            spec = self.dir / f"node{i + 1}.json"
            spec.write_text(json.dumps({
                "pin_dir": str(self.bpffs / f"node{i + 1}"), "ifname": HOST_VETH[i], "ipcache": rows,
                "policy": [[e.ifname, e.identity, e.port, e.proto, e.direction, e.action]
                           for e in self.work.entries[i]],
                "enforce": self.work.enforced[i]}))
            log = open(self.dir / f"node{i + 1}.log", "w")
            self.agents.append(subprocess.Popen(
                ["ip", "netns", "exec", node, sys.executable, "-c", NODE_AGENT, str(spec)], cwd=ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True))
            log.close()
        for i in range(2):
            self.loaded.append(self._answer(i))

    def _answer(self, i: int) -> dict[str, Any]:
        agent = self.agents[i]
        assert agent.stdout is not None
        ready, _, _ = select.select([agent.stdout], [], [], 900)
        line = agent.stdout.readline() if ready else ""
        if not line:
            agent.wait(10)
            raise RuntimeError(f"node{i + 1} agent exited {agent.returncode}: "
                               f"{(self.dir / f'node{i + 1}.log').read_text()[-2000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def agent(self, i: int, cmd: str) -> dict[str, Any]:
        stdin = self.agents[i].stdin
        assert stdin is not None
        stdin.write(cmd + "\n")
        stdin.flush()
        return self._answer(i)

    def close(self) -> None:
        for a in self.agents:
            try:
                if a.poll() is None and a.stdin is not None:
                    a.stdin.write("quit\n")
                    a.stdin.flush()
                    a.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            stop_pid(a)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.mounted:
            subprocess.run(["umount", str(self.bpffs)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the filters ------------------------------------------------------------------------
    def packets(self, mode: str) -> None:
        """Segmentation offload on the pods' interfaces: on (64 KB packets) or off (1500 bytes)."""
        on = "off" if mode == "1500" else "on"
        for ns in (self.pod1, self.pod2):
            sh("ethtool", "-K", "eth0", "tso", on, "gso", on, ns=ns)

    def install(self, case: str) -> None:
        if case in ("ebpf", "tc-noop"):
            for i in range(2):
                self.agent(i, "attach" if case == "ebpf" else "attach-noop")
        elif case == "iptables":
            for i, node in enumerate(self.nodes):
                sh("iptables-restore", input=self._iptables(i), ns=node)
        elif case == "nftables":
            for i, node in enumerate(self.nodes):
                sh("nft", "-f", "-", input=self._nftables(i), ns=node)

    def remove(self, case: str) -> None:
        if case in ("ebpf", "tc-noop"):
            for i in range(2):
                self.agent(i, "detach")
        elif case in ("iptables", "nftables"):
            for node in self.nodes:
                if case == "iptables":  # whichever backend iptables has
                    sh("iptables", "-F", ns=node)
                    sh("iptables", "-X", ns=node)
                sh("nft", "flush", "ruleset", ns=node)

    def _open_direction(self, node: int) -> str:
        """The direction no policy selects on this node's pod: all of it passes, first."""
        return f"-d {POD1}/32" if node == 0 else f"-s {POD2}/32"

    def _iptables(self, node: int) -> str:
        lines = ["*filter", ":FORWARD ACCEPT [0:0]", ":PLXBENCH - [0:0]", "-A FORWARD -j PLXBENCH",
                 f"-A PLXBENCH {self._open_direction(node)} -j ACCEPT"]
        for src, dst, proto, port in self.work.allow_list(node):
            name = "tcp" if proto == 6 else "udp"
            match = f" -p {name} -m {name} --dport {port}" if port else ""
            lines.append(f"-A PLXBENCH -s {src}/32 -d {dst}/32{match} -j ACCEPT")
        lines += ["-A PLXBENCH -j DROP", "COMMIT", ""]
        return "\n".join(lines)

    def _nftables(self, node: int) -> str:
        ported = [f"{s} . {d} . {p}" for s, d, proto, p in self.work.allow_list(node) if p]
        anyport = [f"{s} . {d}" for s, d, proto, p in self.work.allow_list(node) if not p]
        opened = f"ip daddr {POD1}" if node == 0 else f"ip saddr {POD2}"
        return "\n".join([
            "table ip plxbench {",
            "  set ported { type ipv4_addr . ipv4_addr . inet_service; elements = { " +
            ", ".join(ported) + " } }",
            "  set anyport { type ipv4_addr . ipv4_addr; elements = { " + ", ".join(anyport) + " } }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy drop;",
            f"    {opened} accept",
            "    ip saddr . ip daddr . tcp dport @ported accept",
            "    ip saddr . ip daddr @anyport accept",
            "  }",
            "}", ""])

    # ---- measurements ----------------------------------------------------------------------
    def iperf(self, seconds: float) -> float:
        """TCP pod1 -> pod2, Gbit/s received."""
        srv = subprocess.Popen(["ip", "netns", "exec", self.pod2, "iperf3", "-s", "-B", POD2,
                                "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not sh("ss", "-Hltn", f"sport = :{IPERF_PORT}", ns=self.pod2).stdout.strip():
                if time.monotonic() > deadline or srv.poll() is not None:
                    raise RuntimeError("iperf3 server did not start")
                time.sleep(0.02)
            out = ""
            for _ in range(3):
                r = subprocess.run(["ip", "netns", "exec", self.pod1, "iperf3", "-c", POD2, "-p",
                                    str(IPERF_PORT), "-t", str(seconds), "-O", "1", "-J",
                                    "--connect-timeout", "2000"],
                                   capture_output=True, text=True, timeout=seconds + 30)
                try:
                    report = json.loads(r.stdout)
                    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
                except (ValueError, KeyError):  # the server not listening yet, or a failed run
                    out = f"rc {r.returncode}: {r.stdout[-600:]} {r.stderr[-300:]}"
                time.sleep(0.1)
            raise RuntimeError(f"iperf3 failed: {out}")
        finally:
            stop_pid(srv)

    def stranger_passes(self) -> bool:
        """Does a ping from pod1's address outside the ipcache reach pod2? Only with no filter."""
        r = subprocess.run(["ip", "netns", "exec", self.pod1, "ping", "-n", "-c", "3", "-i", "0.1", "-W", "1",
                            "-I", STRANGER, POD2], capture_output=True, text=True, timeout=30)
        return r.returncode == 0

    def ping(self, count: int) -> tuple[float, float, int]:
        """Round trips pod1 -> pod2 every 10 ms: p50 and mean in µs, and how many were lost."""
        r = subprocess.run(["ip", "netns", "exec", self.pod1, "ping", "-n", "-c", str(count), "-i", "0.01",
                            "-W", "1", POD2], capture_output=True, text=True, timeout=count * 0.01 + 30)
        rtts = [float(x) * 1000 for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
        if not rtts:
            raise RuntimeError(f"ping got no replies: {r.stdout[-300:]} {r.stderr[-300:]}")
        return percentile(rtts, 50), statistics.fmean(rtts), count - len(rtts)


@contextmanager
def interrupts_clean_up() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` removes what it made."""
    def stop(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Sample:
    gbps: float
    p50: float
    mean: float
    lost: int


def traffic(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    work = Workload(args.identities, args.rules).build()
    modes = ["gso", "1500"] if args.packets == "both" else [args.packets]
    cases = tuple(c for c in CASES if c == "none" or c in args.cases.split(","))
    results: dict[tuple[str, str], list[Sample]] = {(m, c): [] for m in modes for c in cases}
    setup = {}
    with interrupts_clean_up(), Topology(work) as topo:
        took = ", ".join(f"{x['compiled']:.1f}+{x['filled']:.1f}s" for x in topo.loaded)
        print(f"namespaces {', '.join(topo.namespaces)}; node agents loaded in {took} "
              f"(compile + reconcile); built in {time.perf_counter() - t0:.0f}s", flush=True)
        enforced = {}
        for case in cases:
            t = time.perf_counter()
            topo.install(case)
            setup[case] = time.perf_counter() - t
            try:
                enforced[case] = not topo.stranger_passes()
            finally:
                topo.remove(case)
        print("  a ping from a pod1 address no identity covers is dropped: " +
              ", ".join(f"{c} {'yes' if enforced[c] else 'no'}" for c in cases), flush=True)
        if any(enforced[c] != (c in FILTERS) for c in cases):
            raise RuntimeError("the filters do not enforce the policy as set up; figures would mean nothing")
        counters_before = [topo.agent(i, "counters") for i in range(2)]
        for rnd in range(args.rounds):
            for mode in modes:
                topo.packets(mode)
                order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
                for case in order:
                    topo.install(case)
                    try:
                        p50, mean, lost = topo.ping(args.pings)
                        gbps = topo.iperf(args.seconds)
                    finally:
                        topo.remove(case)
                    results[(mode, case)].append(Sample(gbps, p50, mean, lost))
                    print(f"  round {rnd + 1} {mode:>4} {case:<9} {gbps:6.2f} Gbit/s  ping p50 {p50:5.0f} µs "
                          f"mean {mean:5.0f} µs lost {lost}", flush=True)
        counters = [topo.agent(i, "counters") for i in range(2)]
        loaded = topo.loaded
        costs = program_costs(topo, [c for c in ("tc-noop", "ebpf") if c in cases], modes, args.seconds)
    print()
    print(f"Pod to pod across two nodes (veth, routed), iperf3 TCP {args.seconds:g} s and {args.pings} pings "
          f"at 10 ms, {args.rounds} interleaved rounds, medians; {machine()}")
    print(f"loaded: {work.describe()}")
    for i, x in enumerate(loaded):
        print(f"  node{i + 1} maps as read back: ipcache {x['ipcache']:,}, policy {x['policy']:,}, "
              f"enforce {x['enforce']}; compile {x['compiled']:.1f} s, reconcile {x['filled']:.1f} s")
    if "iptables" in setup:
        print(f"  iptables: {len(work.allow_list(1)):,} rules per node (set up in {setup['iptables']:.1f} s "
              f"for both nodes, backend: {_iptables_backend()})")
    if "nftables" in setup:
        print(f"  nftables sets: set up in {setup['nftables']:.1f} s")
    for i in range(2):
        fwd = counters[i]["forwarded"] - counters_before[i]["forwarded"]
        drop = counters[i]["dropped"] - counters_before[i]["dropped"]
        print(f"  node{i + 1} datapath verdicts during the runs: {fwd:,} forwarded, {drop:,} dropped")
    names = {"gso": "offload on", "1500": "1500-byte"}
    if costs:
        print("\n  time in the programs per run (kernel.bpf_stats_enabled, one more iperf3 run each, "
              "both nodes summed):")
        for (mode, case), per_prog in costs.items():
            print(f"    {names[mode]:>10} {case:<8} " + ", ".join(
                f"{prog} {ns:.0f} ns x {runs:,}" for prog, (ns, runs) in per_prog.items()))
    head = "".join(f" {names[m] + ' Gbit/s':>17} {'ratio':>6}" for m in modes)
    print(f"\n  {'filter':<9}{head} {'ping p50':>9} {'added':>7} {'mean':>6} {'added':>7}  lost")
    for case in cases:
        line = f"  {case:<9}"
        pings: list[tuple[Sample, Sample]] = []
        for mode in modes:
            pairs = list(zip(results[(mode, case)], results[(mode, "none")], strict=True))
            pings += pairs
            line += (f" {statistics.median(x.gbps for x, _ in pairs):17.2f}"
                     f" {statistics.median(x.gbps / b.gbps for x, b in pairs):6.3f}")
        line += (f" {statistics.median(x.p50 for x, _ in pings):7.0f}µs"
                 f" {statistics.median(x.p50 - b.p50 for x, b in pings):+6.0f}µs"
                 f" {statistics.median(x.mean for x, _ in pings):4.0f}µs"
                 f" {statistics.median(x.mean - b.mean for x, b in pings):+6.0f}µs"
                 f"  {sum(x.lost for x, _ in pings)}")
        print(line)
    print("  (ratio: median over rounds of Gbit/s / no filter's in the same round; ping: the "
          f"{len(modes) * args.rounds} ping runs of each filter, each against no filter's in its round)")
    print(f"\nrerun: .venv/bin/python -m bench.datapath.bench --only traffic --rounds {args.rounds} "
          f"--seconds {args.seconds:g} --pings {args.pings} --packets {args.packets} "
          f"--cases {','.join(cases)}")


def program_costs(topo: Topology, cases: list[str], modes: list[str],
                  seconds: float) -> dict[tuple[str, str], dict[str, tuple[float, int]]]:
    """Mean ns per program run during one iperf3 run, by program name, for each case and mode.
    Measured apart from the rounds: the kernel's run-time accounting costs time of its own."""
    ids: dict[str, list[int]] = {}
    for i in range(2):
        for name, pid in topo.agent(i, "prog-ids").items():
            ids.setdefault(name, []).append(pid)

    def totals(name: str) -> tuple[int, int]:
        ns = runs = 0
        for pid in ids[name]:
            info = json.loads(sh("bpftool", "prog", "show", "id", str(pid), "-j").stdout)
            ns += int(info.get("run_time_ns", 0))
            runs += int(info.get("run_cnt", 0))
        return ns, runs

    sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = sysctl.read_text().strip()
    out: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
    sysctl.write_text("1")
    try:
        for mode in modes:
            topo.packets(mode)
            for case in cases:
                progs = ["noop"] if case == "tc-noop" else ["from_pod", "to_pod"]
                topo.install(case)
                try:
                    start = {p: totals(p) for p in progs}
                    topo.iperf(seconds)
                    end = {p: totals(p) for p in progs}
                finally:
                    topo.remove(case)
                out[(mode, case)] = {}
                for p in progs:
                    runs = end[p][1] - start[p][1]
                    out[(mode, case)][p] = ((end[p][0] - start[p][0]) / max(runs, 1), runs)
    finally:
        sysctl.write_text(before)
    return out


def _iptables_backend() -> str:
    r = subprocess.run(["iptables", "--version"], capture_output=True, text=True)
    return r.stdout.strip().rpartition("(")[2].rstrip(")") or "?"


# ---- reconcile rate ----------------------------------------------------------------------------
def reconcile(args: argparse.Namespace) -> None:
    from bpf.loader import Datapath
    from bpf.ops import IpcacheEntry, IpcacheOps
    from plexus.core.reconciler import Reconciler
    from plexus.core.tables import Table

    def row(i: int, identity: int) -> IpcacheEntry:
        return IpcacheEntry(f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32", identity, "172.31.1.11", 1)

    n = args.entries
    rows = [row(i, 100_000 + i % 60_000) for i in range(n)]

    async def full_sync(dp: Datapath, batch_size: int) -> tuple[float, Any, Any, asyncio.Task[None]]:
        table: Table[str, IpcacheEntry] = Table("bpf-ipcache", key=lambda e: e.key)
        rec = Reconciler("bpf-ipcache", table, IpcacheOps(dp), batch_size=batch_size)
        task = asyncio.create_task(rec.run())
        await asyncio.sleep(0.01)  # running and idle, as in the agent
        t0 = time.perf_counter()
        table.replace_where(lambda _r: True, rows)  # what the agent's derivation does
        while len(rec.applied) < n:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - t0
        assert rec.settled()
        return elapsed, table, rec, task

    async def changes(table: Any, rec: Any) -> list[float]:
        out = []
        for c in range(args.changes):
            r = row(c * 97 % n, 200_000 + c)
            t0 = time.perf_counter()
            table.upsert(r)
            while rec.applied.get(r.key) != r:
                await asyncio.sleep(0)
            out.append(time.perf_counter() - t0)
        return out

    async def run(dp: Datapath) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, batch_size in (("one row per op", 1), ("batches of 1024", 1024)):
            dp.ipcache.clear()
            elapsed, table, rec, task = await full_sync(dp, batch_size)
            items = dp.ipcache_items()
            assert len(items) == n and items[rows[12345 % n].prefix][0] == rows[12345 % n].identity
            one = await changes(table, rec)
            task.cancel()
            items = dp.ipcache_items()
            last = {row(c * 97 % n, 0).prefix: 200_000 + c for c in range(args.changes)}
            assert all(items[prefix][0] == identity for prefix, identity in last.items())
            res[name] = (elapsed, one)
        dp.ipcache.clear()
        t0 = time.perf_counter()
        dp.ipcache_set_many([(r.prefix, r.identity, r.host_ip, r.flags) for r in rows])
        res["floor"] = time.perf_counter() - t0
        return res

    work = Path(tempfile.mkdtemp(prefix="plexus-bench-dp-"))
    fs = work / "bpffs"
    fs.mkdir()
    mounted = False
    try:
        with interrupts_clean_up():
            sh("mount", "-t", "bpf", "plx-bench-dp", str(fs))
            mounted = True
            dp = Datapath(fs / "reconcile")
            res = asyncio.run(run(dp))
    finally:
        if mounted:
            subprocess.run(["umount", str(fs)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nipcache map (LPM trie, pinned): {n:,} entries into an empty map through Reconciler + "
          f"IpcacheOps, then {args.changes:,} single changes one at a time; {machine()}")
    print(f"  {'path':<34} {'full sync':>10} {'entries/s':>10} {'change p50':>11} {'change p99':>11}")
    for name in ("one row per op", "batches of 1024"):
        elapsed, one = res[name]
        us = [x * 1e6 for x in one]
        print(f"  {'Reconciler, ' + name:<34} {elapsed:9.2f}s {n / elapsed:10,.0f} "
              f"{percentile(us, 50):9.0f}µs {percentile(us, 99):9.0f}µs")
    print(f"  {'ipcache_set_many alone (floor)':<34} {res['floor']:9.2f}s {n / res['floor']:10,.0f}")
    print(f"rerun: .venv/bin/python -m bench.datapath.bench --only reconcile --entries {n} "
          f"--changes {args.changes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("traffic", "reconcile"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--pings", type=int, default=200)
    p.add_argument("--packets", choices=("both", "gso", "1500"), default="both")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {', '.join(CASES)} (none is always run)")
    p.add_argument("--identities", type=int, default=10_000)
    p.add_argument("--rules", type=int, default=100)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--changes", type=int, default=1000)
    args = p.parse_args()
    steps: list[Callable[[argparse.Namespace], None]] = []
    if args.only in (None, "traffic"):
        steps.append(traffic)
    if args.only in (None, "reconcile"):
        steps.append(reconcile)
    for step in steps:
        step(args)


if __name__ == "__main__":
    main()

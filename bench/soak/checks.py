"""What a soak reads from the lab: every agent's ipcache against the pods that exist, pod to
pod connectivity, agent memory, reconciler errors and ERROR log lines."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexus.core.client import Client, ClientError
from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import Node


@dataclass(frozen=True)
class Pod:
    cluster: str
    node: str
    name: str
    ip: str
    netns: str


@dataclass(frozen=True)
class Mismatch:
    """One ipcache row that disagrees with the pods that exist, as one agent sees it."""

    node: str
    view: str  # "table" (clustermesh endpoints) or "bpf" (the datapath's ipcache map)
    kind: str  # lost, stale, identity
    ip: str
    detail: str


def agent(lab: Lab, n: Node, timeout: float = 5) -> Client:
    return Client(lab.socket(n), timeout=timeout)


def pod_ips(lab: Lab, n: Node) -> dict[str, dict[str, Any]]:
    """The ipcache as the agent of `n` has it, by IP: the clustermesh table and the bpf map."""
    table = {r["ip"]: r for r in agent(lab, n, 15).get("/v1/clustermesh/tables/endpoints")}
    bpf = {str(r["prefix"]).removesuffix("/32"): r for r in agent(lab, n, 15).get("/v1/bpf/ipcache")}
    return {"table": table, "bpf": bpf}


def in_pod_cidrs(lab: Lab, ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n.pod_cidr) for n in lab.topo.nodes())


def infrastructure(lab: Lab) -> set[str]:
    """Pod-CIDR addresses in some ipcache before any pod exists (the nodes' own)."""
    out: set[str] = set()
    for n in lab.topo.nodes():
        for view in pod_ips(lab, n).values():
            out |= {ip for ip in view if in_pod_cidrs(lab, ip)}
    return out


def compare(lab: Lab, pods: list[Pod], infra: set[str]) -> list[Mismatch]:
    """Every agent's two views against `pods`: a pod missing is lost, a pod-CIDR entry of no
    pod is stale, and each pod's identity must be the same in every view of every agent."""
    live = {p.ip: p for p in pods}
    out: list[Mismatch] = []
    identities: dict[str, dict[str, int]] = {}
    for n in lab.topo.nodes():
        try:
            views = pod_ips(lab, n)
        except ClientError as e:
            out.append(Mismatch(n.key, "api", "unreachable", "", str(e)))
            continue
        for view, rows in views.items():
            for ip, p in live.items():
                row = rows.get(ip)
                if row is None:
                    out.append(Mismatch(n.key, view, "lost", ip, f"{p.cluster}/{p.node} pod {p.name}"))
                    continue
                identities.setdefault(ip, {})[f"{n.key}/{view}"] = int(row["identity"])
                if view == "table" and row.get("pod_name") not in ("", p.name):
                    out.append(Mismatch(n.key, view, "stale", ip,
                                        f"names pod {row.get('pod_name')}, the IP is {p.name}'s now"))
            for ip, row in rows.items():
                if ip not in live and ip not in infra and in_pod_cidrs(lab, ip):
                    name = row.get("pod_name") or row.get("hostIP", "")
                    out.append(Mismatch(n.key, view, "stale", ip,
                                        f"identity {row['identity']} {name}".strip()))
    for ip, seen in identities.items():
        if len(set(seen.values())) > 1:
            out.append(Mismatch("*", "*", "identity", ip,
                                ", ".join(f"{k}={v}" for k, v in sorted(seen.items()))))
    return out


def ping(src: str, ip: str) -> bool:
    return ops.run("ping", "-c", "1", "-W", "2", ip, ns=src, check=False).returncode == 0


def connectivity(pods: list[Pod]) -> tuple[int, list[str]]:
    """Each pod pings one other pod on every node (its own included): pairs tried, failures."""
    by_node: dict[str, list[Pod]] = {}
    for p in pods:
        by_node.setdefault(f"{p.cluster}-{p.node}", []).append(p)
    tried, failed = 0, []
    for src in pods:
        for node_pods in by_node.values():
            dst = next((p for p in node_pods if p != src), None)
            if dst is None:
                continue
            tried += 1
            if not ping(src.netns, dst.ip) and not ping(src.netns, dst.ip):
                failed.append(f"{src.cluster}-{src.node}/{src.name} ({src.ip}) -> "
                              f"{dst.cluster}-{dst.node}/{dst.name} ({dst.ip})")
    return tried, failed


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def agent_pids(lab: Lab) -> dict[str, int]:
    """Each node's running agent, by the PID the lab recorded."""
    procs = State.load(lab.state_path).processes
    out = {}
    for n in lab.topo.nodes():
        p = procs.get(f"agent-{n.key}")
        if p is not None and ops.alive(p.pid, p.marker):
            out[n.key] = p.pid
    return out


@dataclass
class Errors:
    """Reconciler objects in error as `plexus status -o json` shows them, sampled."""

    peak: dict[str, int] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)
    unhealthy: Counter[str] = field(default_factory=Counter)

    def sample(self, lab: Lab) -> dict[str, int]:
        now: dict[str, int] = {}
        for n in lab.topo.nodes():
            try:
                st = agent(lab, n, 3).get("/v1/status")
            except ClientError:
                continue
            count = 0
            for module, m in st["modules"].items():
                if m.get("health", "ok") not in ("ok", "degraded"):
                    self.unhealthy[f"{n.key} {module}: {str(m['health'])[:160]}"] += 1
                for rec_name, rec in m.get("reconcilers", {}).items():
                    count += int(rec["objects"].get("error", 0))
                    for err in rec["errors"].values():
                        self.messages[f"{n.key} {module}/{rec_name}: {normalize(str(err))}"] += 1
            now[n.key] = count
            self.peak[n.key] = max(self.peak.get(n.key, 0), count)
        return now


_VARYING = re.compile(r"0x[0-9a-f]+|\b\d+(\.\d+)*\b|'[^']*'")


def normalize(line: str) -> str:
    """A log or error line with its numbers, addresses and quoted names blanked, so repeats
    of one problem count together."""
    return _VARYING.sub("#", line)[:200]


def log_errors(path: Path) -> Counter[str]:
    """ERROR lines of a lab daemon's log (every start appends to it), grouped."""
    out: Counter[str] = Counter()
    if not path.exists():
        return out
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            # named by the exception it ends with, and what ignored it, if anything did
            end = next((ln for ln in lines[i + 1:] if not ln.startswith(" ")), "?")
            ignored = lines[i - 1] if i and lines[i - 1].startswith("Exception ignored") else ""
            out[normalize(f"Traceback: {end} {ignored}".strip())] += 1
        elif " ERROR " in line:
            # "<date> <time> ERROR [east/n1] logger: message"
            out[normalize(line.split(" ERROR ", 1)[-1])] += 1
        elif '"level":"error"' in line:  # etcd's JSON lines
            out[normalize(line.split('"msg":', 1)[-1])] += 1
    return out

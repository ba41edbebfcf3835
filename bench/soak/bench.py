"""Soak: the lab under continuous change and one fault a minute, then a check of what is left.

    .venv/bin/python -m bench.soak.bench [--minutes 30] [--seed 1] [--keep]

From no lab at all: `plexus lab up`, then for `--minutes`
- pods are added and deleted continuously on all four nodes of both clusters, through the
  CNI plugin as `plexus lab pod add/del` does (a failed ADD or DEL is followed by DEL again
  until it succeeds, as a container runtime does);
- PlexusNetworkPolicy manifests are applied, changed and deleted (`plexus apply|delete -f
  --lab <cluster>`);
- one fault a minute, from a fixed list drawn with `--seed` (bench/soak/faults.py), after
  which the lab must be whole again (`--recover` seconds) or is repaired and the fault noted.
Then churn stops, the lab settles, and the run reports agent RSS (start, peak, end, growth),
reconciler errors and ERROR log lines per node, every lost or stale ipcache entry (in the
clustermesh table and in the bpf map, on every agent) and pings between the surviving pods.
The lab is taken down at the end (`--keep` leaves it up); the logs are copied to `--out`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.common import machine
from bench.soak import checks, faults
from bench.soak.checks import Mismatch, Pod
from plexus.core.client import ClientError
from plexus.lab import ops
from plexus.lab.lab import Lab
from plexus.lab.topology import pod_netns

ROOT = Path(__file__).resolve().parents[2]
APPS = ("soak-a", "soak-b", "soak-guarded")  # policies select soak-guarded pods only
GUARDED = "soak-guarded"


@dataclass
class Event:
    at: float
    kind: str
    text: str


@dataclass
class Run:
    """What the soak did and saw, shared by its threads."""

    lab: Lab
    out: Path
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    # Pod changes and `plexus lab up` never overlap: both rewrite the lab's state file.
    lab_lock: threading.Lock = field(default_factory=threading.Lock)
    pods: dict[str, Pod] = field(default_factory=dict)  # by netns; ADD succeeded, no DEL yet
    labels: dict[str, str] = field(default_factory=dict)  # netns -> app label
    undeleted: dict[str, Pod | None] = field(default_factory=dict)  # DEL to repeat until it works
    history: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)  # ip -> events
    events: list[Event] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, dict[str, tuple[int, float]]]] = field(default_factory=list)
    errors: checks.Errors = field(default_factory=checks.Errors)
    restarts: Counter[str] = field(default_factory=Counter)

    def now(self) -> float:
        return time.monotonic() - self.started

    def note(self, kind: str, text: str) -> None:
        self.events.append(Event(self.now(), kind, text))
        print(f"[{self.now():7.1f}s] {kind}: {text}", flush=True)

    def last_fault_before(self, at: float) -> str:
        before = [e for e in self.events if e.kind == "fault" and e.at <= at]
        return f"{before[-1].text} at {before[-1].at:.0f}s" if before else "no fault before it"


# ---- pods ---------------------------------------------------------------------------------


def add_pod(run: Run, rng: random.Random, cluster: str, node: str, name: str) -> None:
    app = rng.choice(APPS)
    ns = pod_netns(run.lab.topo.node(cluster, node), name)
    try:
        info = run.lab.pod_add(cluster, node, name, {"app": app, "soak": "yes"})
    except ops.LabError as e:
        run.ops["add failed"] += 1
        run.failures[f"pod add: {checks.normalize(str(e))}"] += 1
        run.undeleted[ns] = None  # the runtime's answer to a failed ADD: DEL
        return
    pod = Pod(cluster, node, name, str(info["ip"]), ns)
    run.pods[ns] = pod
    run.labels[ns] = app
    run.history.setdefault(pod.ip, []).append((run.now(), "added", f"{cluster}-{node}/{name}"))
    run.ops["add"] += 1


def del_pod(run: Run, ns: str) -> bool:
    """CNI DEL of the pod in `ns` (also for a pod whose ADD failed); False to try again."""
    pod = run.pods.pop(ns, None) or run.undeleted.get(ns)
    run.labels.pop(ns, None)
    if pod is None:
        cluster, node, name = _parse_netns(run.lab, ns)
    else:
        cluster, node, name = pod.cluster, pod.node, pod.name
    if pod is not None and ns not in run.undeleted:
        run.history.setdefault(pod.ip, []).append((run.now(), "deleted", f"{cluster}-{node}/{name}"))
    try:
        run.lab.pod_del(cluster, node, name)
    except ops.LabError as e:
        run.ops["del failed (repeated later)"] += 1
        run.failures[f"pod del: {checks.normalize(str(e))}"] += 1
        run.undeleted[ns] = pod
        return False
    run.undeleted.pop(ns, None)
    run.ops["del"] += 1
    return True


def _parse_netns(lab: Lab, ns: str) -> tuple[str, str, str]:
    for n in lab.topo.nodes():
        prefix = pod_netns(n, "")
        if ns.startswith(prefix):
            return n.cluster, n.name, ns.removeprefix(prefix)
    raise ValueError(f"not a lab pod namespace: {ns}")


def churn_pods(run: Run, seed: int, interval: float, most: int) -> None:
    rng = random.Random(seed)
    nodes = run.lab.topo.nodes()
    seq = 0
    while not run.stop.wait(interval):
        with run.lab_lock:
            for ns in list(run.undeleted):
                del_pod(run, ns)
            n = rng.choice(nodes)
            on = [ns for ns, p in run.pods.items() if (p.cluster, p.node) == (n.cluster, n.name)]
            try:
                if not on or (len(on) < most and rng.random() < 0.5):
                    seq += 1
                    add_pod(run, rng, n.cluster, n.name, f"soak-{seq}")
                else:
                    del_pod(run, rng.choice(sorted(on)))
            except Exception as e:  # noted; the churn goes on
                run.failures[f"pod churn: {type(e).__name__}: {checks.normalize(str(e))}"] += 1


# ---- policies -----------------------------------------------------------------------------


def policy(name: str, port: int, deny: bool) -> str:
    """A policy on the guarded pods: soak-a pods of both clusters in on a TCP port, and
    (`deny`) soak-b pods of the other cluster denied."""
    spec: dict[str, object] = {
        "endpointSelector": {"matchLabels": {"app": GUARDED}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "soak-a"}}],
                     "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}],
    }
    if deny:
        spec["ingressDeny"] = [{"fromEndpoints": [{"matchLabels": {"app": "soak-b"}}]}]
    return yaml.safe_dump({"apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
                           "metadata": {"name": name, "namespace": "default"}, "spec": spec},
                          sort_keys=False)


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def change_policy(run: Run, rng: random.Random, applied: set[tuple[str, str]]) -> None:
    cluster = rng.choice(run.lab.topo.clusters).name
    name = f"soak-{rng.randrange(4)}"
    path = run.out / "policies" / f"{cluster}-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if (cluster, name) in applied and rng.random() < 0.5:
        verb, r = "delete", plexus("delete", "-f", str(path), "--lab", cluster)
        if r.returncode == 0:
            applied.discard((cluster, name))
    else:
        verb = "change" if (cluster, name) in applied else "apply"
        path.write_text(policy(name, rng.randrange(1000, 9000), rng.random() < 0.5))
        r = plexus("apply", "-f", str(path), "--lab", cluster)
        if r.returncode == 0:
            applied.add((cluster, name))
    if r.returncode == 0:
        run.ops[f"policy {verb}"] += 1
    else:
        run.ops[f"policy {verb} failed"] += 1
        why = (r.stderr or r.stdout).strip().splitlines()
        run.failures[f"policy {verb}: {checks.normalize(why[-1] if why else str(r.returncode))}"] += 1


def churn_policies(run: Run, seed: int, interval: float, applied: set[tuple[str, str]]) -> None:
    rng = random.Random(seed)
    while not run.stop.wait(interval):
        try:
            change_policy(run, rng, applied)
        except Exception as e:  # noted; the churn goes on
            run.failures[f"policy churn: {type(e).__name__}: {checks.normalize(str(e))}"] += 1


# ---- health, samples ----------------------------------------------------------------------


def problems(lab: Lab) -> list[str]:
    """What keeps the lab from being whole: dead daemons, clusters not ready, BGP routes
    missing at the router, WireGuard devices gone."""
    out = []
    state = lab.status()["processes"]
    out += [f"{name} dead" for name, p in state.items() if not p["alive"]]
    for n in lab.topo.nodes():
        try:
            st = checks.agent(lab, n, 3).get("/v1/clustermesh/status")
        except ClientError as e:
            out.append(f"{n.key} unreachable: {e}")
            continue
        out += [f"{n.key}: cluster {c} not ready" for c, s in st["clusters"].items() if not s.get("ready")]
        if not ops.link_exists(n.host.netns, n.wg_device):
            out.append(f"{n.key}: WireGuard device {n.wg_device} missing")
    try:
        if not lab._bgp_routes_in():
            out.append("router: a BGP session down or a pod CIDR not learned")
    except ops.LabError as e:
        out.append(f"router: {e}")
    return out


def wait_whole(lab: Lab, timeout: float) -> tuple[float, list[str]]:
    """Seconds until the lab is whole, or the timeout and what is still wrong."""
    t0 = time.monotonic()
    left = problems(lab)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(1)
        left = problems(lab)
    return time.monotonic() - t0, left


def sample(run: Run) -> None:
    pids = checks.agent_pids(run.lab)
    run.rss.append((run.now(), {k: (pid, checks.rss_mb(pid)) for k, pid in pids.items()}))
    run.errors.sample(run.lab)


def sampler(run: Run, interval: float) -> None:
    while not run.stop.wait(interval):
        try:
            sample(run)
        except Exception as e:  # noted; sampling goes on
            run.failures[f"sampling: {type(e).__name__}: {checks.normalize(str(e))}"] += 1


# ---- faults -------------------------------------------------------------------------------


def restart_lab(run: Run) -> Callable[[], str]:
    def restart() -> str:
        with run.lab_lock:
            said = faults.lab_up()
        for name in said.removeprefix("lab up started ").split(", "):
            if name.startswith("agent-"):
                run.restarts[name.removeprefix("agent-")] += 1
        return said
    return restart


def repair(run: Run, left: list[str]) -> None:
    """The lab after a fault it did not recover from: `plexus lab up`, and an agent
    restart for a node whose WireGuard device is gone (nothing else brings it back)."""
    restart = restart_lab(run)
    run.note("repair", restart())
    for n in run.lab.topo.nodes():
        if any(p.startswith(f"{n.key}: WireGuard") for p in left):
            agent = checks.agent_pids(run.lab).get(n.key)
            if agent:
                ops.stop(agent, str(run.lab.root))
            run.note("repair", f"{n.key}: agent restarted for its WireGuard device; {restart()}")


def inject_faults(run: Run, plan: list[faults.Fault], seed: int, every: float, recover: float) -> None:
    rng = random.Random(seed)
    for i, fault in enumerate(plan):
        if run.stop.wait(max(0.0, (i + 0.5) * every - run.now())):
            return
        try:
            one_fault(run, i, fault, rng, recover)
        except Exception as e:  # noted; the next fault comes on time
            run.note("fault failed", f"#{i + 1} {fault.kind}: {type(e).__name__}: {e}")


def one_fault(run: Run, i: int, fault: faults.Fault, rng: random.Random, recover: float) -> None:
    hit = fault.inject(run.lab, rng, restart_lab(run))
    run.note("fault", f"#{i + 1} {hit.kind} {hit.target}: {hit.detail}")
    took, left = wait_whole(run.lab, recover)
    if left:
        run.note("not recovered", f"#{i + 1} {hit.kind} {hit.target} after {took:.0f}s: "
                 + "; ".join(left))
        repair(run, left)
        took, left = wait_whole(run.lab, recover)
        run.note("after repair", "whole" if not left else "; ".join(left))
    else:
        run.note("recovered", f"#{i + 1} {hit.kind} {hit.target} in {took:.1f}s")


# ---- the run ------------------------------------------------------------------------------


def settle(run: Run, pods: list[Pod], infra: set[str], timeout: float) -> tuple[float, list[Mismatch]]:
    t0 = time.monotonic()
    found = checks.compare(run.lab, pods, infra)
    while found and time.monotonic() - t0 < timeout:
        time.sleep(2)
        found = checks.compare(run.lab, pods, infra)
    return time.monotonic() - t0, found


def explain(run: Run, m: Mismatch) -> str:
    told = "; ".join(f"{what} {who} at {at:.0f}s" for at, what, who in run.history.get(m.ip, []))
    last = run.history.get(m.ip, [(run.now(), "", "")])[-1][0]
    return (f"{m.kind} on {m.node} ({m.view}): {m.ip} {m.detail}; pod history: {told or 'none'}; "
            f"last fault before: {run.last_fault_before(last)}")


def report(run: Run, args: argparse.Namespace, took: float, mismatches: list[Mismatch],
           tried: int, unreachable: list[str], log_errors: dict[str, Counter[str]]) -> str:
    lines = [f"machine: {machine()}",
             f"soak: {args.minutes} min, seed {args.seed}, {len(run.events)} events; "
             f"settled in {took:.1f}s"]
    lines.append("\nchurn: " + ", ".join(f"{k} {v}" for k, v in sorted(run.ops.items())))
    for what, count in run.failures.most_common(12):
        lines.append(f"  {count:>4} x {what}")
    lines.append("\nfaults:")
    for e in run.events:
        if e.kind in ("fault", "recovered", "not recovered", "repair", "after repair", "fault failed",
                      "not whole at the end"):
            lines.append(f"  {e.at:7.1f}s {e.kind}: {e.text}")
    lines.append("\nagent RSS (MB): start = after warm-up, end = after settling")
    lines.append(f"  {'agent':<10} {'start':>7} {'peak':>7} {'end':>7} {'growth':>8}  restarts")
    first, last = run.rss[0][1], run.rss[-1][1]
    for n in run.lab.topo.nodes():
        if n.key not in first or n.key not in last:
            lines.append(f"  {n.key:<10} not sampled")
            continue
        (pid0, start), (pid1, end) = first[n.key], last[n.key]
        same = [rss for _, s in run.rss if n.key in s and s[n.key][0] == pid1 for rss in [s[n.key][1]]]
        growth = f"{(end - start) / start * 100:+7.1f}%" if pid0 == pid1 else "restarted"
        lines.append(f"  {n.key:<10} {start:7.1f} {max(same):7.1f} {end:7.1f} {growth:>8}  "
                     f"{run.restarts[n.key]}")
    lines.append("\nreconciler objects in error (peak while sampling / at the end):")
    final = run.errors.sample(run.lab)
    for n in run.lab.topo.nodes():
        lines.append(f"  {n.key:<10} {run.errors.peak.get(n.key, 0):>4} / {final.get(n.key, '?')}")
    for what, count in run.errors.messages.most_common(10):
        lines.append(f"  {count:>4} samples: {what}")
    for what, count in run.errors.unhealthy.most_common(10):
        lines.append(f"  {count:>4} samples unhealthy: {what}")
    lines.append("\nERROR lines in the logs:")
    for name, counts in log_errors.items():
        lines.append(f"  {name}: {sum(counts.values())}")
        for what, count in counts.most_common(6):
            lines.append(f"    {count:>4} x {what}")
    lost = [m for m in mismatches if m.kind == "lost"]
    stale = [m for m in mismatches if m.kind != "lost"]
    lines.append(f"\nipcache after settling: {len(run.pods)} pods live, {len(lost)} lost, "
                 f"{len(stale)} stale or inconsistent")
    lines += [f"  {explain(run, m)}" for m in mismatches[:40]]
    lines.append(f"\nconnectivity between surviving pods: {tried - len(unreachable)} of {tried} pairs")
    lines += [f"  FAIL {u}" for u in unreachable[:20]]
    lines.append(f"\nrerun: .venv/bin/python -m bench.soak.bench {' '.join(sys.argv[1:])}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=int, default=30, help="how long pods, policies and faults run")
    p.add_argument("--seed", type=int, default=1, help="faults, targets and churn are drawn from it")
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--recover", type=float, default=60.0,
                   help="seconds the lab has to be whole again after a fault")
    p.add_argument("--settle", type=float, default=90.0,
                   help="seconds the ipcaches have to agree with the pods once churn stops")
    p.add_argument("--faults", type=lambda s: s.split(","), default=None,
                   help="only these kinds, comma-separated: "
                        + ", ".join(f.kind for f in faults.FAULTS))
    p.add_argument("--pods-per-node", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("/tmp/plexus-soak"),
                   help="where the report, the events and the lab's logs are kept")
    args = p.parse_args()
    args.minutes = max(1, min(args.minutes, 240))
    unknown = set(args.faults or []) - {f.kind for f in faults.FAULTS}
    if unknown:
        p.error(f"unknown fault kinds: {sorted(unknown)}")
    if Path("/var/run/netns/plx-router").exists():
        raise SystemExit("a lab is up: `plexus lab down` first")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    lab = Lab(say=lambda _line: None)
    run = Run(lab, args.out)
    try:
        return soak(run, args)
    finally:
        run.stop.set()
        if lab.root.exists():
            shutil.copytree(lab.root / "logs", args.out / "logs", dirs_exist_ok=True)
        if not args.keep:
            r = plexus("lab", "down")
            print(f"lab down: {'ok' if r.returncode == 0 else r.stderr.strip()}")


def soak(run: Run, args: argparse.Namespace) -> int:
    lab = run.lab
    run.note("start", faults.lab_up())
    infra = checks.infrastructure(lab)
    run.note("warm-up", f"{len(infra)} pod-CIDR addresses of the nodes themselves: {sorted(infra)}")
    rng = random.Random(args.seed)
    for i, n in enumerate(lab.topo.nodes()):
        for j in range(2):
            add_pod(run, rng, n.cluster, n.name, f"warm-{i}{j}")
    applied: set[tuple[str, str]] = set()
    for _ in range(4):
        change_policy(run, rng, applied)
    took, found = settle(run, list(run.pods.values()), infra, 60)
    run.note("warm-up", f"{len(run.pods)} pods, ipcaches agree in {took:.1f}s"
             + (f", NOT: {found[:5]}" if found else ""))
    sample(run)
    run.started = time.monotonic()
    plan = faults.schedule(args.seed, int(args.minutes * 60 // args.fault_every), args.faults)
    run.note("plan", ", ".join(f.kind for f in plan))
    threads = [
        threading.Thread(target=churn_pods, args=(run, args.seed + 1, 1.0, args.pods_per_node),
                         name="pods", daemon=True),
        threading.Thread(target=churn_policies, args=(run, args.seed + 2, 10.0, applied),
                         name="policies", daemon=True),
        threading.Thread(target=sampler, args=(run, 15.0), name="sampler", daemon=True),
    ]
    for t in threads:
        t.start()
    inject_faults(run, plan, args.seed + 3, args.fault_every, args.recover)
    run.stop.wait(max(0.0, args.minutes * 60 - run.now()))
    run.stop.set()
    for t in threads:
        t.join(300)
    run.note("stop", f"churn stopped; {len(run.pods)} pods live, {len(run.undeleted)} DEL to repeat")
    took, left = wait_whole(lab, args.recover)
    if left:
        run.note("not whole at the end", "; ".join(left))
        repair(run, left)
    deadline = time.monotonic() + 60
    while run.undeleted and time.monotonic() < deadline:
        with run.lab_lock:
            for ns in list(run.undeleted):
                del_pod(run, ns)
        time.sleep(1)
    pods = list(run.pods.values())
    took, mismatches = settle(run, pods, infra, args.settle)
    reachable = [p for p in pods if run.labels.get(p.netns) != GUARDED]
    tried, unreachable = checks.connectivity(reachable)
    sample(run)
    logs = {path.stem: checks.log_errors(path) for path in sorted((lab.root / "logs").glob("*.log"))}
    text = report(run, args, took, mismatches, tried, unreachable, logs)
    (args.out / "report.txt").write_text(text + "\n")
    (args.out / "events.txt").write_text("".join(f"{e.at:8.1f}s {e.kind}: {e.text}\n" for e in run.events))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

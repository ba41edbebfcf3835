"""`plexus lab up | status | down | pod add | pod del | vm join | demo`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from plexus.commands.common import LAB_DIR, add_output_arg, emit, table
from plexus.core.client import Client
from plexus.lab.lab import Lab
from plexus.lab.ops import LabError, run
from plexus.lab.topology import ETCD_MEMBER_COUNTS, Node, pod_netns


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lab", help="the whole system on this machine, in network namespaces")
    lab = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    u = lab.add_parser("up", help="build the lab (harmless when it is up)")
    u.add_argument("--etcd-members", type=int, choices=ETCD_MEMBER_COUNTS, default=None,
                   help="etcd members per cluster (default: as the running lab has them, else 1)")
    u.add_argument("--kvstoremesh", action="store_true",
                   help="run a kvstoremesh next to each cluster's apiserver; agents read every "
                        "remote from their own etcd (default: as the running lab has it, else direct)")
    u.set_defaults(func=_up)
    s = lab.add_parser("status", help="what runs, what the agents say, the router's routes")
    add_output_arg(s)
    s.set_defaults(func=_status)
    d = lab.add_parser("down", help="remove everything the lab made")
    d.add_argument("--force", action="store_true",
                   help="also when the lab was brought up from another checkout")
    d.set_defaults(func=_down)
    lab.add_parser("demo", help="up, a few pods, a connectivity report").set_defaults(func=_demo)
    pod = lab.add_parser("pod", help="pods, made through the CNI plugin")
    pods = pod.add_subparsers(dest="pod_command", required=True, metavar="ACTION")
    a = pods.add_parser("add", help="add a pod: plexus lab pod add east n1 web --labels app=web")
    for name in ("cluster", "node", "pod"):
        a.add_argument(name)
    a.add_argument("--labels", default="", help="comma-separated key=value")
    a.add_argument("--namespace", default="default")
    a.set_defaults(func=_pod_add)
    d = pods.add_parser("del", help="delete a pod")
    for name in ("cluster", "node", "pod"):
        d.add_argument(name)
    d.set_defaults(func=_pod_del)
    vm = lab.add_parser("vm", help="the lab's enrolled VM")
    vms = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    j = vms.add_parser("join", help="enrol the VM (when it is not) and start its agent")
    j.add_argument("name", nargs="?", help="the VM (default: every lab VM)")
    j.set_defaults(func=_vm_join)


def _say(line: str) -> None:
    print(line, flush=True)


def _labels(raw: str) -> dict[str, str]:
    out = {}
    for part in filter(None, raw.split(",")):
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise LabError(f"label {part!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


def _guard(fn: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except (LabError, KeyError) as e:
            print(f"plexus lab: {e}", file=sys.stderr)
            return 1
    return wrapped


@_guard
def _up(args: argparse.Namespace) -> int:
    Lab(say=_say).up(etcd_members=args.etcd_members,
                     mesh_mode="kvstoremesh" if args.kvstoremesh else None)
    return 0


@_guard
def _down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    for line in Lab(say=_say).down(force=args.force):
        _say(f"  {line}")
    _say(f"==> lab is down ({time.monotonic() - started:.1f}s)")
    return 0


def _render_status(s: dict[str, Any]) -> str:
    out = ["namespaces: " + ", ".join(f"{k}{'' if v else ' (missing)'}"
                                      for k, v in s["namespaces"].items())]
    out.append(table([(n, p["netns"], p["pid"], "running" if p["alive"] else "DEAD")
                      for n, p in s["processes"].items()], ["PROCESS", "NETNS", "PID", "STATE"]))
    members = [(cluster, m["name"], m["endpoint"], m["pid"] or "",
                "running" if m["alive"] else "DEAD", m["role"], m["revision"] or "")
               for cluster, ms in s.get("etcd", {}).items() for m in ms]
    if members:
        out.append(table(members, ["CLUSTER", "ETCD MEMBER", "ENDPOINT", "PID", "STATE", "ROLE",
                                   "REVISION"]))
    rows = []
    for node, st in s["agents"].items():
        if "error" in st:
            rows.append((node, "unreachable", "", "", st["error"]))
        else:
            mods = st["modules"]
            eps = mods.get("endpoints", {}).get("endpoints", "?")
            clusters = mods.get("clustermesh", {}).get("clusters", {})
            mesh = ",".join(f"{k}:{v}" for k, v in clusters.items()) if isinstance(clusters, dict) else "?"
            health = " ".join(f"{name}={m.get('health', 'ok')}" for name, m in mods.items())
            rows.append((node, "ok", eps, mesh, health))
    out.append(table(rows, ["AGENT", "STATE", "ENDPOINTS", "CLUSTERS", "MODULES"]))
    out.append(f"clustermesh mode: {s.get('meshMode', 'direct')}")
    copies = [(cluster, remote, "yes" if r.get("ready") else "no", sum(r.get("entries", {}).values()),
               r.get("configError") or r.get("lastFailure") or "")
              for cluster, st in s.get("kvstoremesh", {}).items()
              for remote, r in st.get("modules", {}).get("kvstoremesh", {}).get("clusters", {}).items()]
    copies += [(cluster, "", "", "", st["error"]) for cluster, st in s.get("kvstoremesh", {}).items()
               if "error" in st]
    if s.get("kvstoremesh"):
        out.append(table(copies, ["KVSTOREMESH OF", "REMOTE", "READY", "KEYS", "LAST ERROR"]))
    if s["pods"]:
        out.append(table([(p["cluster"], p["node"], p["pod"], p["ip"],
                           ",".join(f"{k}={v}" for k, v in p["labels"].items()))
                          for p in s["pods"].values()], ["CLUSTER", "NODE", "POD", "IP", "LABELS"]))
    out.append("router protocols (BIRD):\n" + s.get("router_protocols", "").strip())
    out.append("router routes (BIRD):\n" + s["router_routes"].strip())
    return "\n\n".join(out)


@_guard
def _status(args: argparse.Namespace) -> int:
    s = Lab(say=_say).status()
    emit(args, s, _render_status)
    # Non-zero when something is missing or dead, for scripts.
    healthy = (all(s["namespaces"].values()) and all(p["alive"] for p in s["processes"].values())
               and not any("error" in a for a in s["agents"].values())
               and not any("error" in k for k in s["kvstoremesh"].values()))
    return 0 if healthy else 1


@_guard
def _pod_add(args: argparse.Namespace) -> int:
    pod = Lab(say=_say).pod_add(args.cluster, args.node, args.pod, _labels(args.labels),
                                args.namespace)
    _say(f"pod {args.pod} on {args.cluster}-{args.node}: {pod['ip']} "
         f"(netns {pod_netns(Lab().topo.node(args.cluster, args.node), args.pod)})")
    return 0


@_guard
def _pod_del(args: argparse.Namespace) -> int:
    Lab(say=_say).pod_del(args.cluster, args.node, args.pod)
    return 0


def ping(from_ns: str, ip: str) -> bool:
    return run("ping", "-c", "1", "-W", "2", ip, ns=from_ns, check=False).returncode == 0


DEMO_PODS = [("east", "n1", "web", "app=web"), ("east", "n1", "client", "app=client"),
             ("east", "n2", "web", "app=web"), ("west", "n1", "web", "app=web")]


@_guard
def _demo(_args: argparse.Namespace) -> int:
    lab = Lab(say=_say)
    lab.up()
    existing = lab.pods()
    _say("==> pods (through the CNI plugin, as a container runtime calls it)")
    for cluster, node, pod, labels in DEMO_PODS:
        ns = pod_netns(lab.topo.node(cluster, node), pod)
        if ns not in existing:
            lab.pod_add(cluster, node, pod, _labels(labels))
    pods = lab.pods()
    for ns, p in pods.items():
        _say(f"  {p['cluster']}/{p['node']} {p['pod']:<8} {p['ip']:<12} netns {ns}")

    def ip(cluster: str, node: str, pod: str) -> str:
        return str(pods[pod_netns(lab.topo.node(cluster, node), pod)]["ip"])

    client = pod_netns(lab.topo.node("east", "n1"), "client")
    checks = [
        ("pod -> pod, same node", client, ip("east", "n1", "web")),
        ("pod -> pod, other node of east", client, ip("east", "n2", "web")),
        ("pod -> pod, west cluster (via the router)", client, ip("west", "n1", "web")),
        ("pod -> external server", client, lab.topo.external[0].ip),
    ]
    _say("==> connectivity")
    ok = True
    for v in lab.topo.vms:
        checks += [(f"VM {v.netns} -> pod, west cluster (encrypted)", v.netns,
                    ip("west", "n1", "web")),
                   (f"pod -> VM {v.netns}", client, v.ip)]
    for what, src, dst in checks:
        good = ping(src, dst)
        ok &= good
        _say(f"  {'ok  ' if good else 'FAIL'} {what}: {dst}")
    for c in lab.topo.clusters:
        for n in c.nodes:
            good = lab.etcd_healthy(n.host.netns, c)
            ok &= good
            _say(f"  {'ok  ' if good else 'FAIL'} {n.key} -> etcd of {c.name} ({c.etcd_url})")
    sessions = lab.birdc("show", "protocols").count("Established")
    learned = [n.pod_cidr for n in lab.topo.nodes()
               if f"[{lab.bgp_protocol(n)} " in lab.birdc("show", "route", n.pod_cidr)]
    _say(f"==> BGP: the router has {sessions} established sessions and learned "
         f"{len(learned)} of {len(lab.topo.nodes())} pod CIDRs from them")
    _say("==> clustermesh (what east-n1 knows)")
    mesh = Client(lab.socket(lab.topo.nodes()[0]), timeout=5)
    for name, c in mesh.get("/v1/clustermesh/status")["clusters"].items():
        _say(f"  cluster {name:<5} id {c['clusterID']}  ready {c['ready']}  nodes {c['nodes']}  "
             f"endpoints {c['endpoints']}  identities {c['identities']}")
    for v in lab.topo.vms:
        st = lab._vm_status(v)
        seen = sum(1 for n in lab.topo.nodes() if any(
            r.get("ip") == v.ip for r in Client(lab.socket(n), timeout=5).get(
                "/v1/clustermesh/tables/endpoints")))
        _say(f"==> VM {lab.vm_name(v)} ({v.ip}) enrolled in {lab.vm_cluster(v).name}: "
             f"{st.get('state', st.get('error'))}, in the ipcache of {seen} of "
             f"{len(lab.topo.nodes())} nodes")
    first: Node = lab.topo.nodes()[0]
    _say(f"""
==> explore
  .venv/bin/plexus lab status                 # processes, agents, pods, router routes
  .venv/bin/plexus status --node {first.key}        # one agent's view
  .venv/bin/plexus clustermesh status --node {first.key}
  .venv/bin/plexus clustermesh list endpoints --node {first.key}
  .venv/bin/plexus encrypt status --node {first.key}
  .venv/bin/plexus observe --node {first.key}              # every verdict, live (Ctrl-C)
  .venv/bin/plexus bpf ct list --node {first.key}          # connections the datapath lets through
  .venv/bin/plexus apply -f examples/global-service.yaml --lab east
  ip netns exec {client} ping {ip('west', 'n1', 'web')}
  ip netns exec plx-router birdc -s {lab.bird_socket()} show route
  .venv/bin/plexus lab pod add east n2 db --labels app=db
  .venv/bin/plexus vm list                                 # enrolled VMs: state, identity
  .venv/bin/plexus status --socket {LAB_DIR}/vms/vm1/agent.sock   # the VM's agent
==> tear down
  make down        (or: .venv/bin/plexus lab down)""")
    return 0 if ok else 1


@_guard
def _vm_join(args: argparse.Namespace) -> int:
    took = Lab(say=_say).vm_join(args.name)
    _say(f"==> VM joined: every node knows it ({took:.1f}s)")
    return 0

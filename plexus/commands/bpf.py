"""`plexus bpf ipcache list`, `plexus bpf policy get <endpoint>`, `plexus bpf lb list`,
`plexus bpf ct list`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bpf", help="what the eBPF datapath holds")
    b = p.add_subparsers(dest="bpf_command", required=True, metavar="MAP")
    _map_command(b, "ipcache", "prefix -> identity", "list", _ipcache)
    get = _map_command(b, "policy", "an endpoint's policy map", "get", _policy)
    get.add_argument("endpoint", help="container id, pod name, IP or host interface")
    _map_command(b, "lb", "global services: frontends -> backends", "list", _lb)
    ct = _map_command(b, "ct", "connections conntrack lets through", "list", _ct)
    ct.add_argument("--endpoint", help="only this pod (namespace/name)")


def _map_command(maps: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str,
                 action: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """`plexus bpf <name> <action>`, with the agent and output options every one takes."""
    actions = maps.add_parser(name, help=summary).add_subparsers(dest="action", required=True,
                                                               metavar="ACTION")
    p = actions.add_parser(action)
    add_agent_args(p)
    add_output_arg(p)
    p.set_defaults(func=func)
    return p


def _ipcache(args: argparse.Namespace) -> int:
    rows = client(args).get("/v1/bpf/ipcache")
    emit(args, rows, lambda rs: table([(r["prefix"], r["identity"], r["hostIP"], r["flags"])
                                       for r in rs], ["PREFIX", "IDENTITY", "HOST", "FLAGS"]))
    return 0


def _ct(args: argparse.Namespace) -> int:
    rows = [r for r in client(args).get("/v1/bpf/ct") if args.endpoint in (None, r["endpoint"])]
    proto = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}

    def at(r: dict[str, Any], side: str) -> str:
        ip: str = r[side]
        if r["protocol"] not in (6, 17):
            return ip  # no ports
        return f"[{ip}]:{r[side + 'Port']}" if ":" in ip else f"{ip}:{r[side + 'Port']}"

    def render(rs: list[dict[str, Any]]) -> str:
        return table([(r["endpoint"] or r["ifindex"], r["direction"].upper(),
                       proto.get(r["protocol"], r["protocol"]), at(r, "source"), at(r, "destination"),
                       f"{r['expiresIn']:.0f}s",
                       " ".join(f for f, on in (("service", r["service"]), ("closing", r["closing"])) if on))
                      for r in rs],
                     ["ENDPOINT", "DIRECTION", "PROTO", "SOURCE", "DESTINATION", "EXPIRES", ""])

    emit(args, rows, render)
    return 0


def _lb(args: argparse.Namespace) -> int:
    rows = client(args).get("/v1/bpf/lb")

    def render(rs: list[dict[str, Any]]) -> str:
        lines = []
        for r in rs:
            bes = r["backends"] or [{"ip": "(none)", "port": "", "cluster": "", "state": "", "id": ""}]
            for i, b in enumerate(bes):
                backend = f"{b['ip']}:{b['port']}" if b["port"] else b["ip"]
                lines.append((r["frontend"] if i == 0 else "", r["service"] if i == 0 else "",
                              r["affinity"] if i == 0 else "", b["id"], backend, b["cluster"],
                              b["state"]))
        return table(lines, ["FRONTEND", "SERVICE", "AFFINITY", "ID", "BACKEND", "CLUSTER", "STATE"])

    emit(args, rows, render)
    return 0


def _render_policy(p: dict[str, Any]) -> str:
    head = (f"endpoint {p['endpoint']} ({p['pod']}) on {p['interface']} (ifindex {p['ifindex']}), "
            f"enforced: {', '.join(p['enforced']) or 'none (allow all)'}")
    proto = {0: "ANY", 6: "TCP", 17: "UDP"}
    return head + "\n" + table([(e["direction"], e["identity"], e["port"] or "ANY",
                                 proto.get(e["proto"], e["proto"]), e["action"])
                                for e in p["entries"]],
                               ["DIRECTION", "IDENTITY", "PORT", "PROTO", "ACTION"])


def _policy(args: argparse.Namespace) -> int:
    emit(args, client(args).get(f"/v1/bpf/policy/{args.endpoint}"), _render_policy)
    return 0

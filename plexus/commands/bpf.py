"""`plexus bpf ipcache list` and `plexus bpf policy get <endpoint>`."""

from __future__ import annotations

import argparse
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bpf", help="what the eBPF datapath holds")
    b = p.add_subparsers(dest="bpf_command", required=True, metavar="MAP")
    ipc = b.add_parser("ipcache", help="prefix -> identity").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    ls = ipc.add_parser("list")
    add_agent_args(ls)
    add_output_arg(ls)
    ls.set_defaults(func=_ipcache)
    pol = b.add_parser("policy", help="an endpoint's policy map").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    get = pol.add_parser("get")
    get.add_argument("endpoint", help="container id, pod name, IP or host interface")
    add_agent_args(get)
    add_output_arg(get)
    get.set_defaults(func=_policy)


def _ipcache(args: argparse.Namespace) -> int:
    rows = client(args).get("/v1/bpf/ipcache")
    emit(args, rows, lambda rs: table([(r["prefix"], r["identity"], r["hostIP"], r["flags"])
                                       for r in rs], ["PREFIX", "IDENTITY", "HOST", "FLAGS"]))
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

"""`plexus bgp peers`, `plexus bgp routes advertised`, `plexus bgp drain`."""

from __future__ import annotations

import argparse
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bgp", help="BGP sessions and announcements of a node")
    bsub = p.add_subparsers(dest="bgp_command", required=True, metavar="SUBCOMMAND")

    q = bsub.add_parser("peers", help="BGP sessions: state, uptime, routes advertised")
    add_agent_args(q)
    add_output_arg(q)
    q.set_defaults(func=_peers)

    r = bsub.add_parser("routes", help="routes of the BGP speaker")
    rsub = r.add_subparsers(dest="routes_command", required=True, metavar="WHICH")
    a = rsub.add_parser("advertised", help="prefixes announced to each peer")
    a.add_argument("--peer", help="only this peer address")
    add_agent_args(a)
    add_output_arg(a)
    a.set_defaults(func=_advertised)

    d = bsub.add_parser("drain", help="withdraw every route of this node (until --undo)")
    d.add_argument("--undo", action="store_true", help="announce again")
    add_agent_args(d)
    d.set_defaults(func=_drain)


def _render_peers(data: dict[str, Any]) -> str:
    rows = [(p["peer"], p["peerASN"], p["localASN"], p["state"], p["uptime"], p["advertised"],
             "yes" if p.get("endOfRib") else "no",
             "; ".join(x for x in (p["reason"], p.get("routesError", "")) if x))
            for p in data["peers"]]
    out = table(rows, ["PEER", "PEER-ASN", "LOCAL-ASN", "STATE", "UPTIME", "ADVERTISED", "EOR", "REASON"])
    if data.get("drained"):
        out += "\n(drained: all routes withdrawn)"
    for where, problem in data.get("problems", {}).items():
        out += f"\nproblem {where}: {problem}"
    return out


def _peers(args: argparse.Namespace) -> int:
    emit(args, client(args).get("/v1/bgp/peers"), _render_peers)
    return 0


def _advertised(args: argparse.Namespace) -> int:
    data = client(args).get("/v1/bgp/routes/advertised", peer=args.peer)
    emit(args, data, lambda d: table([(r["peer"], r["prefix"], r["attributes"]) for r in d],
                                     ["PEER", "PREFIX", "ATTRIBUTES"]))
    return 0


def _drain(args: argparse.Namespace) -> int:
    res = client(args).post("/v1/bgp/undrain" if args.undo else "/v1/bgp/drain", {})
    print("drained: routes withdrawn" if res["drained"] else "undrained: routes announced again")
    return 0

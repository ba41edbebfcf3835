"""`plexus egress list`: policies, the endpoints they select, the active gateway of each
source node and gateway health, as this node's agent sees them."""

from __future__ import annotations

import argparse
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("egress", help="egress gateway policies")
    e = p.add_subparsers(dest="egress_command", required=True, metavar="ACTION")
    s = e.add_parser("list", help="policies, selected endpoints, active gateways, gateway health")
    add_agent_args(s)
    add_output_arg(s)
    s.set_defaults(func=_list)


def render(data: dict[str, Any]) -> str:
    out = []
    for p in data["policies"]:
        head = (f"policy {p['name']}  destinations {','.join(p['destinationCIDRs'])}"
                + (f"  excluded {','.join(p['excludedCIDRs'])}" if p["excludedCIDRs"] else ""))
        gws = table([(i + 1, g["node"], g["egressIP"] or f"(address of {g['interface']})",
                      "healthy" if g["healthy"] else "UNHEALTHY")
                     for i, g in enumerate(p["gateways"])],
                    ["ORDER", "GATEWAY", "EGRESS IP", "HEALTH (this node)"])
        eps = table([(e["ip"], e["cluster"], f"{e['namespace']}/{e['pod']}", e["node"] or "?")
                     for e in p["endpoints"]], ["ENDPOINT", "CLUSTER", "POD", "NODE"])
        act = table([(a["sourceNode"] or "?", a["gateway"] or "none (dropped)",
                      a["egressIP"] or (f"(address of {a['interface']})" if a["interface"] else "-"))
                     for a in p["active"]], ["SOURCE NODE", "ACTIVE GATEWAY", "EGRESS IP"])
        block = [head, gws, eps, act]
        block += [f"problem: {x}" for x in p["problems"]]
        block += [f"conflict: {x}" for x in p["conflicts"]]
        out.append("\n".join(block))
    if not data["policies"]:
        out.append("no egress gateway policies")
    out += [f"rejected: {why}" for why in data["rejected"].values()]  # each names its manifest
    dp = data.get("datapath")
    if dp and dp["loaded"]:
        out.append(f"datapath: {dp['steering']} steering entries, {dp['snat']} translations; "
                   f"egress IPs announced here: {', '.join(dp['announced']) or 'none'}")
        arp = dp.get("arp", {})
        if arp.get("claimed"):
            out.append(f"claimed on this node's segment (gratuitous ARP): {', '.join(arp['claimed'])}")
        out += [f"not claimed: {why}" for why in arp.get("leftAlone", [])]
    if data["health"]:
        out.append(table([(h["reporter"], h["gateway"], "healthy" if h["healthy"] else "UNHEALTHY",
                           h["reason"]) for h in data["health"]],
                         ["REPORTER", "GATEWAY", "HEALTH", "REASON"]))
    return "\n\n".join(out)


def _list(args: argparse.Namespace) -> int:
    emit(args, client(args).get("/v1/egress/list"), render)
    return 0

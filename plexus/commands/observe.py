"""`plexus observe`: flows of one node (its agent) or of every node (the relay), as Hubble shows them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from bpf.flows import FIELDS, Criterion, FilterError, Flow, FlowFilter
from plexus.commands.common import add_agent_args, client, lab_relay_socket
from plexus.core.client import Client, ClientError

RELAY_SOCKET = "/run/plexus/relay.sock"

# CLI flag -> filter field (`--node` picks the lab node to ask; the filter is `--node-name`)
_FLAG_FIELDS = {("node-name" if f == "node" else f): f for f in FIELDS}


class _NotAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        ns.negate_next = True


class _FilterAction(argparse.Action):
    """Collects (field, value, negated) in command-line order: `--not` negates the next one."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        negate = bool(getattr(ns, "negate_next", False))
        ns.negate_next = False
        crits = list(getattr(ns, "criteria", None) or [])
        crits.append((self.dest, str(values), negate))
        ns.criteria = crits


def add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters", "repeat a filter for any of several values; different "
                             "filters must all match; --not negates the filter after it")
    g.add_argument("--not", action=_NotAction, nargs=0, help="negate the next filter")
    helps = {"pod": "[namespace/]pod-name-prefix, or namespace/", "label": "key or key=value",
             "ip": "an address or CIDR", "verdict": "FORWARDED, DROPPED or TRANSLATED",
             "drop-reason": "POLICY_DENIED, SERVICE_BACKEND_NOT_FOUND or NO_EGRESS_GATEWAY",
             "type": "policy-verdict, translation or egress-gateway",
             "protocol": "tcp, udp, icmp, icmpv4, icmpv6",
             "node-name": "cluster/node or node", "service": "[namespace/]name"}
    for flag, field in _FLAG_FIELDS.items():
        base = flag.partition("-")[2] if flag.startswith(("from-", "to-")) else flag
        side = {"from": "the source's ", "to": "the destination's "}.get(flag.partition("-")[0], "")
        g.add_argument(f"--{flag}", dest=field, action=_FilterAction, metavar=base.upper(),
                       help=(f"{side}{base}" + (f" ({helps[base]})" if base in helps else ""))
                       if side or base not in helps else helps[base])
    p.set_defaults(criteria=[], negate_next=False)


def flow_filter(args: argparse.Namespace) -> FlowFilter:
    """The criteria given on the command line: one per field and negation, values OR'ed."""
    grouped: dict[tuple[str, bool], list[str]] = {}
    for field, value, negate in args.criteria:
        grouped.setdefault((field, negate), []).append(value)
    crits = tuple(Criterion(f, tuple(vs), neg) for (f, neg), vs in grouped.items())
    for c in crits:
        c.check()
    return FlowFilter(crits)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("observe", help="flows: policy verdicts and service translations with "
                       "identities, pods and clusters (Hubble's shapes)")
    p.add_argument("--last", type=int, help="the last N flows (default 20, or all since --since)")
    p.add_argument("--since", help="flows from then on: 5m, 30s, 1h, or an RFC 3339 time")
    p.add_argument("-f", "--follow", action="store_true", help="then follow new flows")
    p.add_argument("--no-follow", dest="follow", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", choices=["compact", "json"], default="compact",
                   help="compact lines, or Hubble's JSON (`hubble observe -o json`)")
    add_filter_args(p)
    add_agent_args(p)
    src = p.add_argument_group("every node of every cluster")
    src.add_argument("--relay", nargs="?", const=os.environ.get("PLEXUS_RELAY_SOCKET", RELAY_SOCKET),
                     metavar="SOCKET", help=f"ask the relay (its API socket; default {RELAY_SOCKET} "
                                            "or $PLEXUS_RELAY_SOCKET)")
    src.add_argument("--lab", nargs="?", const="east", metavar="CLUSTER",
                     help="ask the lab's relay of CLUSTER (default east)")
    p.set_defaults(func=_observe)


def render(doc: dict[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(doc, separators=(",", ":"))
    lost = doc.get("lost_events")
    if lost is not None:
        return f"EVENTS LOST: {lost['source']} {lost['num_events_lost']} [{doc.get('node_name', '')}]"
    return Flow.from_json(doc).compact()


def print_stream(docs: Iterator[dict[str, Any]], output: str) -> int:
    try:
        for doc in docs:
            print(render(doc, output), flush=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()
    return 0


def query(args: argparse.Namespace) -> dict[str, Any]:
    flt = flow_filter(args)
    return {"last": args.last, "since": args.since, "follow": "1" if args.follow else None,
            "filters": flt.to_query() if flt.criteria else None}


def _observe(args: argparse.Namespace) -> int:
    try:
        q = query(args)
    except FilterError as e:
        print(f"plexus observe: {e}", file=sys.stderr)
        return 2
    if args.lab:
        source = Client(lab_relay_socket(args.lab))
    elif args.relay:
        source = Client(args.relay)
    else:
        source = client(args)
    try:
        return print_stream(source.stream("/v1/observe", **q), args.output)
    except ClientError as e:
        print(f"plexus observe: {e}", file=sys.stderr)
        return 1


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The observe arguments alone (for tests)."""
    p = argparse.ArgumentParser(prog="plexus observe")
    sub = p.add_subparsers()
    register(sub)
    return p.parse_args(["observe", *argv])

"""`plexus relay --config FILE` runs the relay; `plexus relay status` and `plexus relay url`
ask a running one."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from plexus.commands.common import add_output_arg, emit, lab_relay_socket, table
from plexus.commands.observe import RELAY_SOCKET
from plexus.core.client import Client


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("relay", help="flows of every node of every connected cluster, one stream "
                       "and a web page", allow_abbrev=False,
                       description="Run the relay (with --config), or ask a running one.")
    p.add_argument("--config", type=Path, help="the relay's YAML config (required to run)")
    p.set_defaults(func=_run)
    acts = p.add_subparsers(dest="relay_command", metavar="ACTION")
    st = acts.add_parser("status", help="nodes connected, flows per second, lost events")
    _socket_args(st)
    add_output_arg(st)
    st.set_defaults(func=_status)
    url = acts.add_parser("url", help="where its web page is")
    _socket_args(url)
    url.set_defaults(func=_url)


def _socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=os.environ.get("PLEXUS_RELAY_SOCKET", RELAY_SOCKET),
                   help="the relay's API socket (default: %(default)s, or $PLEXUS_RELAY_SOCKET)")
    p.add_argument("--lab", metavar="CLUSTER", help="the lab's relay of this cluster (east, west)")


def _client(args: argparse.Namespace) -> Client:
    return Client(lab_relay_socket(args.lab) if args.lab else args.socket)


def _run(args: argparse.Namespace) -> int:
    if args.config is None:
        print("plexus relay: --config is required to run (or: plexus relay status | url)", file=sys.stderr)
        return 2
    from plexus.relay.program import load_config, run

    return asyncio.run(run(load_config(args.config)))


def render_status(st: dict[str, Any]) -> str:
    head = (f"relay of {st['cluster']}: {st['connected']}/{len(st['nodes'])} nodes connected, "
            f"{st['flowsPerSecond']} flows/s, {st['flows']} flows, {st['lost']} lost")
    rows = [(n["name"], n["address"], n["state"], n["flows"], n["lost"], n["error"][:80])
            for n in st["nodes"]]
    return head + "\n" + table(rows, ["NODE", "ADDRESS", "STATE", "FLOWS", "LOST", "ERROR"])


def _status(args: argparse.Namespace) -> int:
    st = _client(args).get("/v1/relay/status")
    emit(args, st, render_status)
    return 0 if st["connected"] == len(st["nodes"]) else 1


def _url(args: argparse.Namespace) -> int:
    st = _client(args).get("/v1/relay/status")
    listen = st["listen"]
    print(f"http://{listen['address']}:{listen['port']}/")
    if args.lab:
        print(f"(inside the lab's namespace plx-{args.lab}-cp: "
              f"ip netns exec plx-{args.lab}-cp chromium http://{listen['address']}:{listen['port']}/)",
              file=sys.stderr)
    return 0



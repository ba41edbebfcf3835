"""What every CLI command shares: reaching an agent and printing results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plexus.core.client import Client

LAB_DIR = Path(os.environ.get("PLEXUS_LAB_DIR", "/var/lib/plexus-lab"))


def lab_socket(node: str) -> Path:
    """The API socket of lab node `east-n1` (cluster-node)."""
    return LAB_DIR / "nodes" / node / "agent.sock"


def lab_apiserver_socket(cluster: str) -> Path:
    """The API socket of lab cluster `cluster`'s clustermesh-apiserver."""
    return LAB_DIR / "clusters" / cluster / "apiserver.sock"


def lab_relay_socket(cluster: str) -> Path:
    """The API socket of lab cluster `cluster`'s flow relay."""
    return LAB_DIR / "clusters" / cluster / "relay.sock"


def add_agent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=os.environ.get("PLEXUS_API_SOCKET", "/run/plexus/agent.sock"),
                   help="the agent's API socket (default: %(default)s, or $PLEXUS_API_SOCKET)")
    p.add_argument("--node", help="a lab node such as east-n1 (uses its socket)")


def add_output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def client(args: argparse.Namespace) -> Client:
    return Client(lab_socket(args.node) if getattr(args, "node", None) else args.socket)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    if getattr(args, "output", "table") == "json":
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(render(data))

"""`plexus agent` and `plexus status`."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="run the node agent")
    p.add_argument("--config", required=True, help="agent config file (YAML)")
    p.set_defaults(func=_agent)

    p = sub.add_parser("status", help="show the local agent's status")
    add_agent_args(p)
    add_output_arg(p)
    p.set_defaults(func=_status)


def _agent(args: argparse.Namespace) -> int:
    from plexus.agent import run
    from plexus.core import log

    log.setup("info")
    return asyncio.run(run(args.config))


def _render_status(s: dict[str, Any]) -> str:
    lines = [f"cluster {s['cluster']} (id {s['clusterID']})  node {s['node']}  pid {s['pid']}"]
    for name, m in s["modules"].items():
        health = m.pop("health", "ok")
        reconcilers = m.pop("reconcilers", {})
        if m.pop("degraded", "") and health == "ok":
            health = "degraded"
        lines.append(f"  {name:<12} {health:<8} {json.dumps(m, default=str)}")
        lines.extend(_render_reconciler(rname, r) for rname, r in reconcilers.items())
    return "\n".join(lines)


def _render_reconciler(name: str, r: dict[str, Any]) -> str:
    o = r["objects"]
    line = f"    {name:<24} pending {o['pending']}  done {o['done']}  error {o['error']}"
    if not r.get("running", True):
        line += "  (stopped)"
    if r.get("last_error"):
        line += f"  last error: {r['last_error']}"
    if r.get("prune_error"):
        line += f"  prune error: {r['prune_error']}"
    return line


def _status(args: argparse.Namespace) -> int:
    emit(args, client(args).get("/v1/status"), _render_status)
    return 0

"""`plexus encrypt status | rotate-key`."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from plexus.commands.common import add_agent_args, add_output_arg, client, emit, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("encrypt", help="WireGuard transparent encryption")
    e = p.add_subparsers(dest="encrypt_command", required=True, metavar="ACTION")
    s = e.add_parser("status", help="backend, device, key, peers with handshakes and bytes")
    add_agent_args(s)
    add_output_arg(s)
    s.set_defaults(func=_status)
    r = e.add_parser("rotate-key", help="replace this node's key; peers follow within a handshake")
    add_agent_args(r)
    r.set_defaults(func=_rotate)


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _render(s: dict[str, Any]) -> str:
    if not s.get("enabled"):
        return "encryption: disabled"
    head = (f"backend {s['backend']}  device {s['device']}  port {s['port']}  mtu {s['mtu']}  "
            f"strict {s['strict']}\npublic key {s['publicKey']}")
    rows = [(p["node"], p["endpoint"], ",".join(p["allowedIPs"]), _when(p["latestHandshake"]),
             p["rxBytes"], p["txBytes"]) for p in s["peers"]]
    out = [head + _device_line(s.get("deviceHealth")),
           table(rows, ["NODE", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"])]
    if s["refused"]:
        out.append("refused:\n" + "\n".join(f"  {n}: {why}" for n, why in s["refused"].items()))
    return "\n\n".join(out)


def _device_line(health: dict[str, Any] | None) -> str:
    if not health:
        return ""
    state = "up" if health["up"] else f"DOWN since {_when(health['downSince'])}"
    line = f"\ndevice {state}  restarts {health['restarts']}"
    last = health.get("lastOutage")
    if last:
        line += (f"  last outage {_when(last['since'])} for {last['seconds']}s"
                 f" ({last['reason']})")
    if health.get("lastError"):
        line += f"\nrestart failing: {health['lastError']}"
    return line


def _status(args: argparse.Namespace) -> int:
    emit(args, client(args).get("/v1/encryption/status"), _render)
    return 0


def _rotate(args: argparse.Namespace) -> int:
    out = client(args).post("/v1/encryption/rotate-key", {})
    print(f"new public key {out['publicKey']}")
    return 0

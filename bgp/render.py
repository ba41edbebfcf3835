"""ExaBGP's config file and environment, rendered from typed neighbors and routes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from bgp.commands import CommandError, address_text, attrs_text, grouped, prefix_text, safe
from bgp.tables import IPAddress, IPNetwork, Neighbor, RouteAttrs

BRIDGE = Path(__file__).with_name("bridge.py")
PROCESS = "plexus"


def render_config(neighbors: Iterable[Neighbor], routes: Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]],
                  socket_path: Path, batch: int) -> str:
    """ExaBGP's config. The agent starts ExaBGP with no routes (the API sends them); routes
    are rendered only to check them with ExaBGP's parser."""
    run = f"{sys.executable} {BRIDGE} {socket_path}"
    if any(c.isspace() or c in ";{}\"'" for c in f"{sys.executable}{BRIDGE}{socket_path}"):
        raise CommandError(f"paths must not contain spaces or ';{{}}\"': {run}")
    out = [f"process {PROCESS} {{", f"    run {safe(run)};", "    encoder json;", "}", ""]
    for n in sorted(neighbors, key=lambda n: (n.peer_address.version, n.peer_address)):
        out += _neighbor_section(n, routes.get(n.peer_address, {}), batch)
    return "\n".join(out)


def _neighbor_section(n: Neighbor, routes: Mapping[IPNetwork, RouteAttrs], batch: int) -> list[str]:
    out = [
        f"neighbor {address_text(n.peer_address)} {{",
        f"    description \"{safe(n.instance)}/{safe(n.name)}\";",
        f"    router-id {address_text(n.router_id)};",
        f"    local-address {address_text(n.local_address)};",
        f"    local-as {int(n.local_asn)};",
        f"    peer-as {int(n.peer_asn)};",
        f"    hold-time {int(n.hold_time)};",
        f"    connect {int(n.port)};",
        "    group-updates true;",
        # End-of-RIB only when the agent says its routes are queued (bgp/speaker.py).
        "    manual-eor true;",
    ]
    if n.multihop > 1:
        out.append(f"    outgoing-ttl {int(n.multihop)};")
    if n.password is not None:
        pw = safe(n.password)
        if '"' in pw or "\\" in pw:
            raise CommandError("password must not contain quotes or backslashes")
        out.append(f"    md5-password \"{pw}\";")
    out.append("    capability {")
    if n.graceful_restart is not None:
        out.append(f"        graceful-restart {int(n.graceful_restart)};")
    out += ["    }", "    family {"]
    out += [f"        {f} unicast;" for f in n.families if f in ("ipv4", "ipv6")]
    out += ["    }", "    api {", f"        processes [ {PROCESS} ];", "        neighbor-changes;",
            "    }"]
    if routes:
        out.append("    static {")
        # One `route` per prefix: the bulk `attributes ... nlri` form is not usable in a
        # static section (its routes are never sent).
        for a, nets in grouped(routes.items(), batch):
            at = attrs_text(a)
            out += [f"        route {prefix_text(x)} {at};" for x in nets]
        out.append("    }")
    out += ["}", ""]
    return out


def write_config(path: Path, text: str) -> None:
    """Replace the config file atomically, readable only by us (it holds MD5 passwords)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def exabgp_env(reactor_speed: float, run_dir: Path, async_limit: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("exabgp")}
    env.update({
        "exabgp_api_ack": "true",
        "exabgp_api_encoder": "json",
        "exabgp_api_cli": "false",
        "exabgp_api_respawn": "true",
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_pid": "",
        "exabgp_log_destination": "stdout",
        "exabgp_log_level": "INFO",
        "exabgp_log_packets": "false",
        "exabgp_log_routes": "false",
        "exabgp_log_rib": "false",
        "exabgp_log_configuration": "false",
        "exabgp_log_processes": "true",
        "exabgp_log_network": "true",
        "exabgp_tcp_bind": "",
        "exabgp_reactor_speed": f"{reactor_speed:g}",
        "exabgp_cache_attributes": "true",
        "exabgp_bgp_passive": "false",
    })
    env["PLEXUS_EXABGP_ASYNC_LIMIT"] = str(int(async_limit))  # read by bgp/launcher.py
    env["PATH"] = env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = str(run_dir)
    env["PLEXUS_PARENT_PID"] = str(os.getpid())  # bgp/launcher.py dies with this process
    return env

"""A node and a router in two fresh network namespaces, joined by a veth; BIRD 2 runs in
the router namespace. Used by the BGP tests and bench/bgp."""

from __future__ import annotations

import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import add_netns, del_netns, sh, stop_pid, sweep_stale_netns

NODE_IP, ROUTER_IP = "10.255.0.1", "10.255.0.2"
NODE_ASN, ROUTER_ASN = 65001, 65000


@dataclass
class Lab:
    node_ns: str
    router_ns: str
    tmp: Path
    bird: subprocess.Popen[Any] | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    node_link: str = ""
    router_link: str = ""

    @property
    def bird_sock(self) -> Path:
        return self.tmp / "bird.ctl"

    def start_bird(self, *, password: str | None = None, hold: int = 9, extra: str = "",
                   peers: str = "", node_asn: int = NODE_ASN, router_asn: int = ROUTER_ASN,
                   graceful: bool = True) -> None:
        pw = f'    password "{password}";\n' if password else ""
        conf = f"""
log "{self.tmp}/bird.log" all;
router id {ROUTER_IP};
protocol device {{ }}
protocol bgp node {{
    local {ROUTER_IP} as {router_asn};
    neighbor {NODE_IP} as {node_asn};
    direct;
    hold time {hold};
    connect retry time 1;
    error wait time 1, 2;
    graceful restart {"on" if graceful else "off"};
{pw}    ipv4 {{ import all; export none; }};
    allow bgp_local_pref on;
{extra}
}}
{peers}
"""
        (self.tmp / "bird.conf").write_text(conf)
        self.bird = subprocess.Popen(
            ["ip", "netns", "exec", self.router_ns, "bird", "-f", "-c", str(self.tmp / "bird.conf"),
             "-s", str(self.bird_sock), "-P", str(self.tmp / "bird.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def add_link_addresses(self, node_cidr: str, router_cidr: str) -> None:
        """A second subnet on the node-router link, e.g. for a second BGP session."""
        sh("ip", "addr", "add", node_cidr, "dev", self.node_link, ns=self.node_ns)
        sh("ip", "addr", "add", router_cidr, "dev", self.router_link, ns=self.router_ns)

    def stop_bird(self) -> None:
        if self.bird is not None:
            stop_pid(self.bird)
            self.bird = None

    def birdc(self, *cmd: str) -> str:
        r = subprocess.run(["birdc", "-s", str(self.bird_sock), *cmd], capture_output=True, text=True,
                           timeout=60)
        return r.stdout

    def protocol_state(self, name: str = "node") -> str:
        out = self.birdc("show", "protocols", name)
        for line in out.splitlines():
            if line.startswith(name + " "):
                return line
        return ""

    def established(self, name: str = "node") -> bool:
        return "Established" in self.protocol_state(name)

    def session(self, name: str = "node") -> tuple[str, float]:
        """(state, seconds of the day it has held since): the same session has the same pair.
        BIRD prints the time from its monotonic clock, so two reads may differ by a
        millisecond: compare the time with a tolerance (same_session)."""
        line = self.protocol_state(name)
        m = re.search(r"(\d+):(\d+):(\d+(?:\.\d+)?)\s+(\S+)\s*$", line)
        if not m:
            return line, -1.0
        return m[4], int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])

    def same_session(self, before: tuple[str, float], name: str = "node") -> bool:
        state, since = self.session(name)
        return state == before[0] and abs(since - before[1]) < 0.05

    def route_count(self, protocol: str = "node") -> int:
        out = self.birdc("show", "route", "count", "protocol", protocol)
        m = re.search(r"(\d+) of \d+ routes", out)
        return int(m[1]) if m else -1

    def routes(self, protocol: str = "node") -> dict[str, dict[str, str]]:
        """prefix -> {'communities', 'large', 'local_pref'} from `show route all`."""
        out = self.birdc("show", "route", "all", "protocol", protocol)
        routes: dict[str, dict[str, str]] = {}
        cur: dict[str, str] | None = None
        for line in out.splitlines():
            m = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+|[0-9a-f:]+/\d+)\s", line)
            if m:
                cur = routes.setdefault(m[1], {"communities": "", "large": "", "local_pref": ""})
                continue
            if cur is None:
                continue
            s = line.strip()
            if s.startswith("BGP.community:"):
                cur["communities"] = s.split(":", 1)[1].strip()
            elif s.startswith("BGP.large_community:"):
                cur["large"] = s.split(":", 1)[1].strip()
            elif s.startswith("BGP.local_pref:"):
                cur["local_pref"] = s.split(":", 1)[1].strip()
        return routes

    def close(self) -> None:
        self.stop_bird()
        for p in self.procs:
            stop_pid(p)


@contextmanager
def bgp_lab(prefix: str = "plx-tb") -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    node_ns, router_ns = f"{prefix}n{tag}", f"{prefix}r{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="plexus-bgp-"))
    created: list[str] = []
    lab = Lab(node_ns, router_ns, tmp)
    sweep_stale_netns()  # benchmarks use this lab too, outside pytest's session start
    try:
        for ns in (node_ns, router_ns):
            created.append(ns)
            add_netns(ns)
        a, b = f"plxtb{tag}a", f"plxtb{tag}b"
        lab.node_link, lab.router_link = a, b
        sh("ip", "link", "add", a, "netns", node_ns, "type", "veth", "peer", "name", b, "netns", router_ns)
        sh("ip", "addr", "add", f"{NODE_IP}/30", "dev", a, ns=node_ns)
        sh("ip", "addr", "add", f"{ROUTER_IP}/30", "dev", b, ns=router_ns)
        sh("ip", "link", "set", a, "up", ns=node_ns)
        sh("ip", "link", "set", b, "up", ns=router_ns)
        yield lab
    finally:
        lab.close()
        for ns in created:
            del_netns(ns)
        subprocess.run(["rm", "-rf", str(tmp)], capture_output=True)

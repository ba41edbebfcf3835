"""BIRD 2, FRR (zebra + bgpd) and GoBGP as the router of a tests/bgp_lab.py lab, behind one
interface, so the BGP tests run the same checks against each.

Each router peers with the node over the lab's IPv4 link and carries IPv4 and IPv6 unicast
on that one session; `routes` reads its RIB (JSON where the router has it) into the same
shape. Every process is started by PID into the lab's list (stopped by Lab.close), every
file lives under the lab's temp dir.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tests.bgp_lab import NODE_ASN, NODE_IP, ROUTER_ASN, ROUTER_IP, Lab
from tests.support import sh

NODE_IP6, ROUTER_IP6 = "fd00:255::1", "fd00:255::2"
ROUTERS = ("bird", "frr", "gobgp")
FRR_DIR = Path("/usr/lib/frr")
# FRR names well-known communities in its JSON; the other routers give the numbers.
FRR_WELL_KNOWN = {"noExport": "65535:65281", "noAdvertise": "65535:65282", "localAs": "65535:65283",
                  "noPeer": "65535:65284", "blackhole": "65535:666", "gracefulShutdown": "65535:0",
                  "acceptOwn": "65535:1", "llgrStale": "65535:6", "noLlgr": "65535:7"}


@dataclass(frozen=True)
class Route:
    """One path as the router holds it."""

    next_hop: str
    as_path: tuple[int, ...] = ()
    local_pref: int | None = None
    communities: tuple[str, ...] = ()
    large: tuple[str, ...] = ()


class Router(Protocol):
    name: str

    def established(self) -> bool: ...

    def routes(self, family: str = "ipv4") -> dict[str, Route]: ...

    def has(self, prefix: str) -> bool:
        """Whether the router holds a route for exactly this prefix (one quick query)."""
        ...

    def count(self, family: str = "ipv4") -> int:
        """Routes from the node the router holds now, stale ones (graceful restart) included;
        -1 when the router does not answer."""
        ...


def available(kind: str) -> bool:
    return {"bird": shutil.which("bird") is not None,
            "frr": (FRR_DIR / "bgpd").exists() and shutil.which("vtysh") is not None,
            "gobgp": shutil.which("gobgpd") is not None and shutil.which("gobgp") is not None}[kind]


def add_ipv6(lab: Lab) -> None:
    """IPv6 on the lab's link: the node's address is the next hop of its IPv6 routes."""
    for ns, link, ip in ((lab.node_ns, lab.node_link, NODE_IP6),
                         (lab.router_ns, lab.router_link, ROUTER_IP6)):
        sh("ip", "addr", "add", f"{ip}/64", "dev", link, "nodad", ns=ns)


def start_router(lab: Lab, kind: str, *, node_asn: int = NODE_ASN, router_asn: int = ROUTER_ASN,
                 hold: int = 9, graceful: bool = True) -> Router:
    """The router, with graceful restart (helper for the node's sessions) unless told not to."""
    if kind == "bird":
        return Bird.start(lab, node_asn, router_asn, hold, graceful)
    if kind == "frr":
        return Frr.start(lab, node_asn, router_asn, hold, graceful)
    if kind == "gobgp":
        return GoBgp.start(lab, node_asn, router_asn, hold, graceful)
    raise ValueError(kind)


def _popen(lab: Lab, *cmd: str, log: Path) -> subprocess.Popen[Any]:
    with log.open("ab") as out:
        p = subprocess.Popen(["ip", "netns", "exec", lab.router_ns, *cmd], stdout=out, stderr=out)
    lab.procs.append(p)
    return p


# ---- BIRD --------------------------------------------------------------------------------

class Bird:
    name = "bird"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    @classmethod
    def start(cls, lab: Lab, node_asn: int, router_asn: int, hold: int, graceful: bool = True) -> Bird:
        lab.start_bird(node_asn=node_asn, router_asn=router_asn, hold=hold, graceful=graceful,
                       extra="    ipv6 { import all; export none; };")
        return cls(lab)

    def has(self, prefix: str) -> bool:
        return prefix in self.lab.birdc("show", "route", prefix)

    def established(self) -> bool:
        return self.lab.established()

    def count(self, family: str = "ipv4") -> int:
        table = "master4" if family == "ipv4" else "master6"
        out = self.lab.birdc("show", "route", "count", "table", table, "protocol", "node")
        m = re.search(r"(\d+) of \d+ routes", out)
        return int(m[1]) if m else -1

    def routes(self, family: str = "ipv4") -> dict[str, Route]:
        table = "master4" if family == "ipv4" else "master6"
        out = self.lab.birdc("show", "route", "all", "table", table, "protocol", "node")
        routes: dict[str, dict[str, Any]] = {}
        cur: dict[str, Any] | None = None
        for line in out.splitlines():
            m = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+|[0-9a-f:]+/\d+)\s", line)
            if m:
                cur = routes.setdefault(m[1], {})
                continue
            if cur is None or ":" not in line:
                continue
            key, value = (x.strip() for x in line.strip().split(":", 1))
            if key == "BGP.next_hop":
                cur["next_hop"] = value.split()[0]
            elif key == "BGP.as_path":
                cur["as_path"] = tuple(int(x) for x in value.split())
            elif key == "BGP.local_pref":
                cur["local_pref"] = int(value)
            elif key == "BGP.community":
                cur["communities"] = tuple(f"{a}:{b}" for a, b in re.findall(r"\((\d+),(\d+)\)", value))
            elif key == "BGP.large_community":
                cur["large"] = tuple(f"{a}:{b}:{c}" for a, b, c in
                                     re.findall(r"\((\d+), (\d+), (\d+)\)", value))
        return {p: Route(**r) for p, r in routes.items()}


# ---- FRR ---------------------------------------------------------------------------------

class Frr:
    """zebra and bgpd of Debian's frr, with their own config, pid and vty files."""

    name = "frr"

    def __init__(self, lab: Lab, run: Path) -> None:
        self.lab = lab
        self.run = run

    @classmethod
    def start(cls, lab: Lab, node_asn: int, router_asn: int, hold: int, graceful: bool = True) -> Frr:
        run = lab.tmp / "frr"
        run.mkdir()
        # FRR drops to its own user: it may pass through the lab's dir and owns its own
        lab.tmp.chmod(0o711)
        shutil.chown(run, "frr", "frr")
        (run / "zebra.conf").write_text("hostname router\n")
        keepalive = max(1, hold // 3)
        (run / "bgpd.conf").write_text(f"""hostname router
router bgp {router_asn}
 bgp router-id {ROUTER_IP}
 no bgp ebgp-requires-policy
 no bgp network import-check
 bgp graceful-restart{"" if graceful else "-disable"}
 neighbor {NODE_IP} remote-as {node_asn}
 neighbor {NODE_IP} timers {keepalive} {hold}
 neighbor {NODE_IP} timers connect 1
 address-family ipv4 unicast
  neighbor {NODE_IP} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {NODE_IP} activate
 exit-address-family
""")
        common = ["-z", str(run / "zserv.api"), "--vty_socket", str(run), "-P", "0"]
        _popen(lab, str(FRR_DIR / "zebra"), "-f", str(run / "zebra.conf"), "-i", str(run / "zebra.pid"),
               *common, "--log", f"file:{run}/zebra.log", log=run / "zebra.out")
        deadline = time.monotonic() + 10
        while not (run / "zserv.api").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # bgpd resolves next hops through zebra: start it once zebra listens
        _popen(lab, str(FRR_DIR / "bgpd"), "-f", str(run / "bgpd.conf"), "-i", str(run / "bgpd.pid"),
               *common, "-l", ROUTER_IP, "--log", f"file:{run}/bgpd.log", log=run / "bgpd.out")
        return cls(lab, run)

    def vtysh(self, command: str) -> Any:
        r = subprocess.run(["ip", "netns", "exec", self.lab.router_ns, "vtysh", "--vty_socket", str(self.run),
                            "-c", command], capture_output=True, text=True, timeout=30)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {}

    def established(self) -> bool:
        n = self.vtysh(f"show bgp neighbors {NODE_IP} json").get(NODE_IP, {})
        return bool(n.get("bgpState") == "Established")

    def has(self, prefix: str) -> bool:
        family = "ipv6" if ":" in prefix else "ipv4"
        return bool(self.vtysh(f"show bgp {family} unicast {prefix} json").get("paths"))

    def count(self, family: str = "ipv4") -> int:
        # a walk of the table for the node's paths, stale ones included (the summary's
        # ribCount counts the table's tree nodes, pfxRcd only what the session accepted)
        walk = self.vtysh(f"show bgp {family} unicast neighbors {NODE_IP} prefix-counts json"
                          ).get("ribTableWalkCounters")
        return int(walk["All RIB"]) - int(walk.get("Removed", 0)) if walk else -1

    def routes(self, family: str = "ipv4") -> dict[str, Route]:
        """The table's prefixes, then each one's path in detail (FRR 8.4 has no `detail json`
        for a whole table)."""
        out: dict[str, Route] = {}
        for prefix in self.vtysh(f"show bgp {family} unicast json").get("routes") or {}:
            paths = self.vtysh(f"show bgp {family} unicast {prefix} json").get("paths") or []
            if not paths:
                continue  # withdrawn meanwhile
            p = paths[0]
            hops = p.get("nexthops") or [{}]
            path = str(p.get("aspath", {}).get("string", "")).split()
            out[prefix] = Route(
                next_hop=str(hops[0].get("ip", "")),
                as_path=tuple(int(x) for x in path if x.isdigit()),
                local_pref=p.get("locPrf", p.get("localpref")),
                communities=tuple(FRR_WELL_KNOWN.get(c, c) for c in p.get("community", {}).get("list", [])),
                large=tuple(p.get("largeCommunity", {}).get("list", [])))
        return out


# ---- GoBGP -------------------------------------------------------------------------------

class GoBgp:
    """gobgpd with a TOML config, read through the gobgp CLI's JSON."""

    name = "gobgp"
    API = "127.0.0.1:50051"  # the router namespace's own loopback

    def __init__(self, lab: Lab, run: Path) -> None:
        self.lab = lab
        self.run = run

    @classmethod
    def start(cls, lab: Lab, node_asn: int, router_asn: int, hold: int, graceful: bool = True) -> GoBgp:
        run = lab.tmp / "gobgp"
        run.mkdir()
        afis = "".join(f"""
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "{f}"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = {"true" if graceful else "false"}
""" for f in ("ipv4-unicast", "ipv6-unicast"))
        (run / "gobgpd.toml").write_text(f"""[global.config]
  as = {router_asn}
  router-id = "{ROUTER_IP}"
  port = 179
  local-address-list = ["{ROUTER_IP}"]

[[neighbors]]
  [neighbors.config]
    neighbor-address = "{NODE_IP}"
    peer-as = {node_asn}
  [neighbors.timers.config]
    hold-time = {hold}
    keepalive-interval = {max(1, hold // 3)}
    connect-retry = 1
  [neighbors.graceful-restart.config]
    enabled = {"true" if graceful else "false"}
    restart-time = 120
{afis}""")
        _popen(lab, "gobgpd", "-f", str(run / "gobgpd.toml"), "-t", "toml", "--api-hosts", cls.API,
               "--pprof-disable", log=run / "gobgpd.log")
        return cls(lab, run)

    def gobgp(self, *args: str) -> Any:
        host, port = self.API.split(":")
        r = subprocess.run(["ip", "netns", "exec", self.lab.router_ns, "gobgp", "-u", host, "-p", port, "-j",
                            *args], capture_output=True, text=True, timeout=30)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def monitor(self, family: str) -> Monitor:
        """`gobgp monitor global rib --current` (what the RIB holds, then every change), its
        JSON lines in a file (started into the lab's list)."""
        path = self.run / f"monitor-{family}.jsonl"
        host, port = self.API.split(":")
        _popen(self.lab, "gobgp", "-u", host, "-p", port, "-j", "monitor", "global", "rib", "--current",
               "-a", family, log=path)
        return Monitor(path)

    def established(self) -> bool:
        n = self.gobgp("neighbor", NODE_IP)
        return isinstance(n, dict) and n.get("state", {}).get("session_state") in (6, "established")

    def has(self, prefix: str) -> bool:
        family = "ipv6" if ":" in prefix else "ipv4"
        rib = self.gobgp("global", "rib", "-a", family, prefix)
        return isinstance(rib, dict) and prefix in rib

    def count(self, family: str = "ipv4") -> int:
        summary = self.gobgp("global", "rib", "summary", "-a", family)
        return int(summary.get("num_destination", 0)) if isinstance(summary, dict) else -1

    def routes(self, family: str = "ipv4") -> dict[str, Route]:
        rib = self.gobgp("global", "rib", "-a", family) or {}
        out: dict[str, Route] = {}
        for prefix, paths in rib.items() if isinstance(rib, dict) else ():
            # a RIB read while gobgpd changes it can come back partly formed: skip that part
            if not isinstance(paths, list) or not paths or not isinstance(paths[0], dict):
                continue
            attrs = {a.get("type"): a for a in paths[0].get("attrs", []) if isinstance(a, dict)}
            nh = attrs.get(3, {}).get("nexthop") or attrs.get(14, {}).get("nexthop", "")
            path = [n for seg in attrs.get(2, {}).get("as_paths", []) for n in seg.get("asns", [])]
            comms = tuple(f"{c >> 16}:{c & 0xFFFF}" for c in attrs.get(8, {}).get("communities", []))
            large = tuple(f"{c['ASN']}:{c['LocalData1']}:{c['LocalData2']}"
                          for c in attrs.get(32, {}).get("value", []))
            out[prefix] = Route(next_hop=str(nh), as_path=tuple(path), communities=comms, large=large,
                                local_pref=attrs.get(5, {}).get("value"))
        return out


@dataclass(frozen=True)
class Monitor:
    path: Path

    def events(self) -> list[tuple[str, bool]]:
        """(prefix, withdrawn) in the order GoBGP's RIB saw them."""
        out = []
        for line in self.path.read_text().splitlines():
            try:
                paths = json.loads(line)
            except ValueError:
                continue
            if isinstance(paths, list):
                out += [(p["nlri"]["prefix"], bool(p.get("withdrawal"))) for p in paths if "nlri" in p]
        return out

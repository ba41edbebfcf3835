"""BGP announcement speed into BIRD 2: Plexus (ExaBGP driver) vs GoBGP and BIRD as the speaker;
and Plexus into FRR and GoBGP as the router too (--routers).

Run (root, from the repo root):
    .venv/bin/python -m bench.bgp.bench [--sizes 10000,100000] [--changes 50] [--modes ...]
        [--routers bird,frr,gobgp]

Modes: start, api, api-text (Plexus: routes known when ExaBGP starts, sent through the API as
soon as it connects; sent on the live session as `plexus-bulk`; as ExaBGP's text commands),
bird (BIRD as the speaker), gobgp-live,
gobgp-preload, gobgp-mrt (GoBGP: routes added through gRPC on the live session; before the
session; `gobgp mrt inject`, reporting how many gobgpd kept). Everything runs in two fresh
network namespaces (plx-tb...) joined by a veth; gobgpd's gRPC is a unix socket; nothing
touches the root namespace. Prints one line per speaker and size. --routers applies to the
Plexus modes (the others speak to BIRD); each change is timed until the router answers a
query for the new prefix (birdc, vtysh or the gobgp CLI, so it includes one query's time).
Restarts are measured by bench/bgp/restart.py.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bgp.config import BGPConfig
from bgp.ops import RoutesOps
from bgp.speaker import Speaker
from bgp.tables import IPNetwork, Neighbor, PeerRoutes, RouteAttrs
from tests.bgp_lab import NODE_ASN, NODE_IP, ROUTER_ASN, ROUTER_IP, bgp_lab
from tests.bgp_routers import start_router

ATTRS = RouteAttrs(((65000, 100),), ((65001, 1, 2),), None)
PEER = ipaddress.ip_address(ROUTER_IP)
BATCH = 2000


def prefixes(n: int) -> list[ipaddress.IPv4Network]:
    base = int(ipaddress.ip_address("10.0.0.0"))
    return [ipaddress.IPv4Network((base + i, 32)) for i in range(n)]


def neighbor() -> Neighbor:
    return Neighbor(PEER, ROUTER_ASN, NODE_ASN, ipaddress.IPv4Address(NODE_IP),
                    ipaddress.ip_address(NODE_IP), hold_time=30, keepalive=10)


async def until_all(count: Callable[[], int], n: int, t_est: float, limit: float) -> dict[str, float]:
    """Seconds from established until the router holds 99% and then all of the n prefixes."""
    t99 = await wait_for(lambda: count() >= n * 0.99, limit, 0.02)
    t_all = await wait_for(lambda: count() >= n, limit, 0.02)
    return {"established_to_99pct": t99 - t_est, "established_to_all": t_all - t_est}


async def wait_for(cond: Callable[[], object], limit: float, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise TimeoutError
        await asyncio.sleep(interval)
    return time.monotonic()


async def plexus_run(n: int, mode: str, changes: int, speed: float, limit: float,
                     kind: str = "bird") -> dict[str, float]:
    """mode start: routes known when ExaBGP starts (sent as soon as its API connects); api:
    routes arrive after the session is up, as `plexus-bulk` commands (api-text: as ExaBGP's
    text `announce attributes ... nlri`). kind: the router."""
    out: dict[str, float] = {}
    with bgp_lab() as lab:
        router = start_router(lab, kind, hold=30)
        routes: dict[IPNetwork, RouteAttrs] = {p: ATTRS for p in prefixes(n)}
        sp = Speaker(lab.tmp / "sp", ["ip", "netns", "exec", lab.node_ns, *BGPConfig().exabgp],
                     reactor_speed=speed, batch=BATCH, bulk=mode != "api-text")
        ops = RoutesOps(sp)
        sp.configure({PEER: neighbor()})
        task = asyncio.ensure_future(sp.run())
        try:
            t_start = time.monotonic()
            if mode == "start":
                await wait_for(sp.ready, limit, 0.005)
                await ops.update(PeerRoutes(PEER, routes))
            t_est = await wait_for(router.established, limit, 0.01)
            out["start_to_established"] = t_est - t_start
            if mode != "start":
                await wait_for(sp.ready, 10)
                out["bulk_command"] = float(await sp.bulk_supported())
                await ops.update(PeerRoutes(PEER, routes))
            out.update(await until_all(router.count, n, t_est, limit))
            if changes:
                await wait_for(sp.ready, 10)
                sp.announced.load(PEER, routes)
                lat = []
                cur = dict(routes)
                for i in range(changes):
                    net = ipaddress.ip_network(f"172.16.{i}.0/24")
                    cur = {**cur, net: ATTRS}
                    t0 = time.monotonic()
                    await ops.update(PeerRoutes(PEER, cur))
                    await wait_for(partial(router.has, str(net)), 10, 0.002)
                    lat.append(time.monotonic() - t0)
                lat.sort()
                out["change_p50_ms"] = 1000 * statistics.median(lat)
                out["change_p99_ms"] = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                out["change_max_ms"] = 1000 * lat[-1]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return out


async def bird_run(n: int, limit: float) -> dict[str, float]:
    """A second BIRD in the node namespace, speaking the same prefixes from static routes."""
    with bgp_lab() as lab:
        lab.start_bird(hold=30)
        conf = lab.tmp / "speaker.conf"
        routes = "\n".join(f"    route {p} blackhole;" for p in prefixes(n))
        conf.write_text(f"""
router id {NODE_IP};
protocol device {{ }}
protocol static prefixes {{ ipv4;
{routes}
}}
protocol bgp uplink {{
    local {NODE_IP} as {NODE_ASN};
    neighbor {ROUTER_IP} as {ROUTER_ASN};
    hold time 30;
    connect retry time 1;
    ipv4 {{ import none; export all; next hop self; }};
}}
""")
        sock = lab.tmp / "speaker.ctl"
        t_start = time.monotonic()
        proc = subprocess.Popen(["ip", "netns", "exec", lab.node_ns, "bird", "-f", "-c", str(conf),  # noqa: ASYNC220
                                 "-s", str(sock), "-P", str(lab.tmp / "speaker.pid")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.procs.append(proc)
        t_est = await wait_for(lab.established, limit, 0.005)
        held = await until_all(lab.route_count, n, t_est, limit)
        return {"start_to_established": t_est - t_start, **held}


async def gobgp_run(n: int, mode: str, limit: float) -> dict[str, float]:
    """GoBGP as the speaker. gobgp-live: routes added through gRPC once the session is up;
    gobgp-preload: added before the router starts; gobgp-mrt: `gobgp mrt inject global` with a
    TABLE_DUMPv2 file, reporting how many routes gobgpd holds afterwards."""
    from bench.bgp import gobgp

    out: dict[str, float] = {}
    nets = prefixes(n)
    pattrs = gobgp.path_attributes(ATTRS.communities, ATTRS.large_communities, ATTRS.local_pref)
    with bgp_lab() as lab:
        conf = gobgp.config(NODE_IP, NODE_ASN, ROUTER_IP, ROUTER_ASN, hold=30)
        proc, sock = gobgp.start(lab.node_ns, lab.tmp, conf)
        lab.procs.append(proc)
        if mode == "gobgp-mrt":
            mrt = lab.tmp / "routes.mrt"
            mrt.write_bytes(gobgp.mrt_table_dump(nets, NODE_IP, NODE_ASN, ATTRS.communities,
                                                 ATTRS.large_communities))
            t0 = time.monotonic()
            r = await asyncio.to_thread(gobgp.cli, sock, "mrt", "inject", "global", str(mrt))
            out["inject_s"] = time.monotonic() - t0
            out["cli_exit"] = r.returncode
            # gobgpd may still be taking what the CLI sent: wait until the count stops moving.
            last, t_last = -2, time.monotonic()
            while time.monotonic() - t_last < 2 and time.monotonic() - t0 < limit:
                c = await asyncio.to_thread(gobgp.rib_count, sock)
                if c != last:
                    last, t_last = c, time.monotonic()
                await asyncio.sleep(0.1)
            out["loaded"] = last
            out["of"] = n
            return out
        if mode == "gobgp-preload":
            t0 = time.monotonic()
            await asyncio.to_thread(gobgp.add_paths, sock, gobgp.add_path_requests(nets, pattrs))
            out["inject_s"] = time.monotonic() - t0
            out["loaded"] = await asyncio.to_thread(gobgp.rib_count, sock)
            t_start = time.monotonic()
            lab.start_bird(hold=30)
            t_est = await wait_for(lab.established, limit, 0.005)
            out["start_to_established"] = t_est - t_start
        else:
            lab.start_bird(hold=30)
            t_start = time.monotonic()
            t_est = await wait_for(lab.established, limit, 0.005)
            out["start_to_established"] = t_est - t_start
            inject = asyncio.ensure_future(
                asyncio.to_thread(gobgp.add_paths, sock, gobgp.add_path_requests(nets, pattrs)))
        out.update(await until_all(lab.route_count, n, t_est, limit))
        if mode == "gobgp-live":
            await inject
            out["loaded"] = await asyncio.to_thread(gobgp.rib_count, sock)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--speed", type=float, default=0.5)
    ap.add_argument("--modes", default="start,api,api-text,bird,gobgp-live,gobgp-preload,gobgp-mrt")
    ap.add_argument("--routers", default="bird", help="routers for the Plexus modes: bird,frr,gobgp")
    ap.add_argument("--limit", type=float, default=240.0)
    ap.add_argument("--batch", type=int, default=BATCH, help="prefixes per bulk API command")
    a = ap.parse_args()
    globals()["BATCH"] = a.batch
    from plexus.lab.ops import hold_machine_lock
    hold_machine_lock()
    print(f"# kernel {subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}, "
          f"cmd: {' '.join(sys.argv)}")
    for n in [int(x) for x in a.sizes.split(",")]:
        for mode in a.modes.split(","):
            try:
                if mode == "bird":
                    r = asyncio.run(bird_run(n, a.limit))
                elif mode.startswith("gobgp"):
                    r = asyncio.run(gobgp_run(n, mode, a.limit))
                else:
                    for kind in a.routers.split(","):
                        r = asyncio.run(plexus_run(n, mode, a.changes if n == 10000 else 0, a.speed,
                                                   a.limit, kind))
                        print(f"N={n} speaker={mode} router={kind} "
                              + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
                    continue
            except TimeoutError:
                print(f"N={n} speaker={mode}: timed out after {a.limit}s", flush=True)
                continue
            print(f"N={n} speaker={mode} router=bird " + " ".join(f"{k}={v:.3f}" for k, v in r.items()),
                  flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()

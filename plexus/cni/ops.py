"""The pod's wiring, Calico-style: a veth per pod, a /32 inside, no bridge.

Pod side: `eth0` with `<ip>/32`, a link route to 169.254.1.1 and a default route via it;
the gateway is a permanent neighbour with the host veth's MAC (the host veth also answers
by proxy ARP). Node side: `<ip>/32` routes to the host veth. Every pod's traffic crosses
its own host veth, where the datapath attaches its programs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.cni.errors import NETLINK_FAILURE, CniError
from plexus.core.netlink import AGENT_NETNS, Netlink

GATEWAY = "169.254.1.1"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def host_ifname(container_id: str, ifname: str = "eth0") -> str:
    digest = hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()
    return "plx" + digest[:11]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Run the block inside the network namespace at `path`, then come back."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)


@dataclass(frozen=True)
class PodLink:
    host_ifname: str
    host_mac: str
    pod_ifname: str
    pod_mac: str


def _sysctl(name: str, value: str) -> None:
    path = f"/proc/sys/{name}"
    with open(path) as f:
        if f.read().strip() == value:
            return
    with open(path, "w") as f:
        f.write(value)


def _mac(ipr: IPRoute, index: int) -> str:
    return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def add(netns: str, ifname: str, host_if: str, ip: str, mtu: int,
        host: Netlink = AGENT_NETNS) -> PodLink:
    """Create and configure the pod's veth; undo what was done on failure. The node's side
    is in `host`, the namespace the plugin runs in unless named."""
    tmp = "plxtmp" + host_if[3:12]
    try:
        with host.route() as ipr:
            if _index(ipr, host_if) is not None:
                ipr.link("del", ifname=host_if)
            ipr.link("add", ifname=host_if, kind="veth", peer=tmp)
            host_idx = _index(ipr, host_if)
            tmp_idx = _index(ipr, tmp)
            assert host_idx is not None and tmp_idx is not None
            ipr.link("set", index=host_idx, mtu=mtu)
            ns_fd = os.open(netns, os.O_RDONLY)
            try:
                ipr.link("set", index=tmp_idx, net_ns_fd=ns_fd)
            finally:
                os.close(ns_fd)
            with host.entered():
                _sysctl(f"net/ipv4/conf/{host_if}/proxy_arp", "1")
                # The node routes between its pods (runs in the node's namespace).
                _sysctl("net/ipv4/ip_forward", "1")
            ipr.link("set", index=host_idx, state="up")
            ipr.route("replace", dst=f"{ip}/32", oif=host_idx, scope="link")
            host_mac = _mac(ipr, host_idx)
        with in_netns(netns), IPRoute() as ipr:
            idx = _index(ipr, tmp)
            if idx is None:
                raise CniError(NETLINK_FAILURE, f"pod side of {host_if} vanished")
            ipr.link("set", index=idx, ifname=ifname, mtu=mtu)
            ipr.addr("add", index=idx, address=ip, prefixlen=32)
            ipr.link("set", index=idx, state="up")
            lo = _index(ipr, "lo")
            if lo is not None:
                ipr.link("set", index=lo, state="up")
            ipr.route("replace", dst=f"{GATEWAY}/32", oif=idx, scope="link")
            # A permanent neighbour for the gateway: the pod never depends on proxy ARP
            # finding a route on the node.
            ipr.neigh("replace", dst=GATEWAY, lladdr=host_mac, ifindex=idx, state=0x80)
            ipr.route("replace", dst="0.0.0.0/0", gateway=GATEWAY, oif=idx)
            pod_mac = _mac(ipr, idx)
    except (NetlinkError, OSError) as e:
        remove(host_if, host)
        raise CniError(NETLINK_FAILURE, f"cannot wire pod interface {ifname}", str(e)) from None
    return PodLink(host_if, host_mac, ifname, pod_mac)


def remove(host_if: str, host: Netlink = AGENT_NETNS) -> bool:
    """Delete the host veth (its peer goes with it); gone already is success."""
    with host.route() as ipr:
        idx = _index(ipr, host_if)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != 19:  # ENODEV: raced with the namespace going away
                raise
        return True


def check(netns: str, ifname: str, host_if: str, ip: str,
          host: Netlink = AGENT_NETNS) -> list[str]:
    """What differs from the wiring `add` makes; empty when all is in place."""
    problems: list[str] = []
    with host.route() as ipr:
        idx = _index(ipr, host_if)
        if idx is None:
            return [f"host interface {host_if} is missing"]
        routes = ipr.route("get", dst=ip)
        if not routes or routes[0].get_attr("RTA_OIF") != idx:
            problems.append(f"node has no route to {ip} via {host_if}")
    if not os.path.exists(netns):
        return [*problems, f"network namespace {netns} is missing"]
    with in_netns(netns), IPRoute() as ipr:
        pidx = _index(ipr, ifname)
        if pidx is None:
            return [*problems, f"pod interface {ifname} is missing"]
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=pidx)]
        if ip not in addrs:
            problems.append(f"{ifname} lacks address {ip}")
        defaults = [r for r in ipr.get_routes(family=2) if r["dst_len"] == 0
                    and r.get_attr("RTA_GATEWAY") == GATEWAY]
        if not defaults:
            problems.append(f"pod has no default route via {GATEWAY}")
    return problems

"""tc clsact attachment through pyroute2: replace in place, so there is no window."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
TC_PRIORITY = 1  # of our filter on each clsact hook of a pod's host veth
TC_HANDLE = 1


def ifindex(ifname: str) -> int | None:
    """One ioctl, not a netlink dump: policy entries look their veth up one by one."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def attach(ifname: str, from_pod: tuple[int, str], to_pod: tuple[int, str]) -> int:
    """Attach both programs to a host veth; returns its ifindex. Replacing is atomic."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"interface {ifname} is gone")
        idx = int(found[0])
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: adopted from a previous run
                raise
        for parent, (fd, name) in ((INGRESS, from_pod), (EGRESS, to_pod)):
            ipr.tc("replace-filter", "bpf", idx, f":{TC_HANDLE:x}", fd=fd, name=name, parent=parent,
                   classid=1, direct_action=True, prio=TC_PRIORITY)
        return idx


def detach(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        try:
            ipr.tc("del", "clsact", found[0])
        except NetlinkError as e:
            if e.code not in (2, 22):  # nothing attached
                raise

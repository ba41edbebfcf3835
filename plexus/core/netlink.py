"""Netlink handles for one network namespace: the one the agent runs in, unless named.

Ops classes take a `Netlink` and open every handle through it, so the same class that
manages the node's kernel state in production manages a throwaway namespace in a test.
pyroute2 is imported when a handle is opened, not when this module is.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyroute2 import IPRoute, WireGuard

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class Netlink:
    """Where netlink requests go. `netns` is a name under /var/run/netns or a path; None is
    the namespace of the calling process, and costs nothing more than a plain IPRoute()."""

    netns: str | None = None

    @property
    def path(self) -> str | None:
        if self.netns is None or self.netns.startswith("/"):
            return self.netns
        return f"{NETNS_DIR}/{self.netns}"

    def route(self) -> IPRoute:
        """An rtnetlink socket (links, addresses, routes, rules, tc)."""
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute()
        # flags=0: a namespace that is not there is an error, never made on the fly
        return IPRoute(netns=self.path, flags=0)

    def wireguard(self) -> WireGuard:
        """A socket of the WireGuard generic-netlink family."""
        from pyroute2 import WireGuard

        if self.netns is None:
            return WireGuard()
        return WireGuard(netns=self.path, flags=0)

    def ifindex(self, ifname: str) -> int | None:
        """An interface's index; None when there is no such interface."""
        if self.netns is None:
            try:  # one ioctl, not a netlink dump: callers look veths up one by one
                return socket.if_nametoindex(ifname)
            except OSError:
                return None
        with self.route() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def argv(self, cmd: list[str]) -> list[str]:
        """A command line that runs `cmd` in this namespace (`ip netns exec` execs it, so
        the process started keeps the pid it is known by)."""
        if self.netns is None:
            return list(cmd)
        return ["ip", "netns", "exec", self.netns, *cmd]

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this namespace for the block: for what is not netlink
        (a sysctl under /proc/sys/net). Call it from a worker thread, never the event loop's."""
        path = self.path
        if path is None:
            yield
            return
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns_path(path)
            try:
                yield
            finally:
                _setns(here)
        finally:
            os.close(here)


AGENT_NETNS = Netlink()


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _setns_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)

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
from typing import Any

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
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

    # Any: pyroute2 ships no type information
    def route(self) -> Any:
        """An rtnetlink socket (links, addresses, routes, rules, tc)."""
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute()
        return IPRoute(fileno=self._socket(NETLINK_ROUTE))

    def wireguard(self) -> Any:
        """A socket of the WireGuard generic-netlink family."""
        from pyroute2 import WireGuard

        if self.netns is None:
            return WireGuard()
        return WireGuard(fileno=self._socket(NETLINK_GENERIC))

    def ifindex(self, ifname: str) -> int | None:
        """An interface's index; None when there is no such interface."""
        # one ioctl, not a netlink dump: callers look veths up one by one, on the event loop
        with self.entered():
            try:
                return socket.if_nametoindex(ifname)
            except OSError:
                return None

    def argv(self, cmd: list[str]) -> list[str]:
        """A command line that runs `cmd` in this namespace (`ip netns exec` execs it, so
        the process started keeps the pid it is known by)."""
        if self.netns is None:
            return list(cmd)
        return ["ip", "netns", "exec", self.netns, *cmd]

    def _socket(self, protocol: int) -> int:
        """A netlink socket made in this namespace, where it stays bound whichever thread
        uses it. Made from this thread rather than by pyroute2's forked child: no fork in a
        threaded process, and a namespace that is not there is an error, never created."""
        with self.entered():
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol)
        return sock.detach()

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this namespace for the block: for what is not netlink
        (a sysctl under /proc/sys/net, an ioctl). Nothing else runs on the thread meanwhile, so
        a block that does not wait may run on the event loop's."""
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

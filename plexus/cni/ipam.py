"""Host-local IPAM over the node's pod CIDR, persisted as one file per allocated address.

A lock file serializes concurrent plugin runs; allocations live in the agent's state dir,
so neither a plugin nor an agent restart can hand out an address twice. An allocation is
owned by (container id, interface): asking again returns the same address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plexus.cni.errors import IP_EXHAUSTED, CniError


class Ipam:
    def __init__(self, data_dir: Path, cidr: str) -> None:
        self.network = ipaddress.ip_network(cidr, strict=False)
        self.dir = data_dir / str(self.network).replace("/", "_")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _owner(container_id: str, ifname: str) -> str:
        return f"{container_id}\n{ifname}\n"

    def _usable(self) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        # The network and broadcast addresses are never handed out.
        yield from self.network.hosts()

    def _find(self, owner: str) -> str | None:
        for f in self.dir.iterdir():
            if f.name.startswith("."):
                continue
            try:
                if f.read_text() == owner:
                    return f.name
            except OSError:
                continue
        return None

    def allocate(self, container_id: str, ifname: str) -> str:
        owner = self._owner(container_id, ifname)
        with self._locked():
            existing = self._find(owner)
            if existing:
                return existing
            last_file = self.dir / ".last"
            last = last_file.read_text().strip() if last_file.exists() else ""
            candidates = list(self._usable())
            # Round-robin from the last handed-out address, so a freed address is not
            # reused at once by the next pod.
            start = 0
            if last:
                for i, ip in enumerate(candidates):
                    if str(ip) == last:
                        start = i + 1
                        break
            for ip in candidates[start:] + candidates[:start]:
                path = self.dir / str(ip)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(owner)
                    f.flush()
                    os.fsync(f.fileno())
                last_file.write_text(str(ip))
                return str(ip)
        raise CniError(IP_EXHAUSTED, f"no free address in pod CIDR {self.network}",
                       f"{len(candidates)} addresses, all allocated")

    def lookup(self, container_id: str, ifname: str) -> str | None:
        if not self.dir.exists():
            return None
        with self._locked():
            return self._find(self._owner(container_id, ifname))

    def release(self, container_id: str, ifname: str) -> str | None:
        """Free the owner's address; releasing what is not allocated is success."""
        if not self.dir.exists():
            return None
        with self._locked():
            found = self._find(self._owner(container_id, ifname))
            if found:
                (self.dir / found).unlink(missing_ok=True)
            return found

    def allocated(self) -> dict[str, str]:
        if not self.dir.exists():
            return {}
        out = {}
        for f in self.dir.iterdir():
            if not f.name.startswith("."):
                out[f.name] = f.read_text().split("\n")[0]
        return out

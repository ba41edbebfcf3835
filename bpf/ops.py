"""Reconciler targets: the ipcache map, the policy map, and program attachment."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bpf import attach
from bpf.ipcache import IpcacheEntry as IpcacheEntry  # re-exported: rows of IpcacheOps
from bpf.lb import LbBackend, LbFrontend, LbMaps
from bpf.loader import Datapath
from bpf.policy import Enforced, PolicyEntry
from plexus.core.netlink import AGENT_NETNS, Netlink
from plexus.core.reconciler import TemporaryError
from plexus.core.tables import Table


@dataclass(frozen=True)
class Attachment:
    ifname: str

    @property
    def key(self) -> str:
        return self.ifname


class IpcacheOps:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    async def update(self, e: IpcacheEntry) -> None:
        self.dp.ipcache_set(e.prefix, e.identity, e.host_ip, e.flags)

    async def update_batch(self, rows: Sequence[IpcacheEntry]) -> None:
        self.dp.ipcache_set_many([(e.prefix, e.identity, e.host_ip, e.flags) for e in rows])

    async def delete(self, e: IpcacheEntry) -> None:
        self.dp.ipcache_delete(e.prefix)

    async def prune(self, rows: Iterable[IpcacheEntry]) -> None:
        # reading the whole map takes ~1 s at 100k entries: not on the event loop
        present = await asyncio.to_thread(self.dp.ipcache_items)
        keep = {r.prefix for r in rows}  # read after the walk: a row added meanwhile stays
        for prefix in present.keys() - keep:
            self.dp.ipcache_delete(prefix)


class Ifindexes:
    """Interface indexes of host veths (netlink is synchronous: it runs in a thread)."""

    def __init__(self, netlink: Netlink = AGENT_NETNS) -> None:
        self.cache: dict[str, int] = {}
        self.netlink = netlink

    async def find(self, ifname: str) -> int | None:
        if ifname in self.cache:
            return self.cache[ifname]
        return attach.ifindex(ifname, self.netlink)

    async def resolve(self, ifnames: Iterable[str]) -> dict[str, int]:
        """Every interface that exists, looked up now: a prune must not forget a live one
        just because no update has touched it since a restart."""
        out = {}
        for name in set(ifnames):
            idx = await self.find(name)
            if idx is not None:
                self.cache[name] = out[name] = idx
        return out

    async def get(self, ifname: str) -> int:
        idx = attach.ifindex(ifname, self.netlink)
        if idx is None:
            raise TemporaryError(f"interface {ifname} not there yet", delay=1.0)
        self.cache[ifname] = idx
        return idx


class PolicyOps:
    def __init__(self, dp: Datapath, ifindexes: Ifindexes) -> None:
        self.dp = dp
        self.ifindexes = ifindexes

    async def update(self, e: PolicyEntry) -> None:
        idx = await self.ifindexes.get(e.ifname)
        self.dp.policy_set(idx, e.identity, e.port, e.proto, e.direction, e.action)

    async def delete(self, e: PolicyEntry) -> None:
        idx = await self.ifindexes.find(e.ifname)
        if idx is not None:
            self.dp.policy_delete(idx, e.identity, e.port, e.proto, e.direction)

    async def prune(self, rows: Iterable[PolicyEntry]) -> None:
        present = await asyncio.to_thread(self.dp.policy_items)
        rows = list(rows)
        idx = await self.ifindexes.resolve(r.ifname for r in rows)
        # by key only: an entry with another action is the refresh's to rewrite; deleting it
        # would open a gap, and its row may have changed while the map was read
        keep = {(idx[r.ifname], r.identity, r.port, r.proto, r.direction)
                for r in rows if r.ifname in idx}
        for item in present:
            if item[:5] not in keep:
                self.dp.policy_delete(*item[:5])


class EnforceOps:
    def __init__(self, dp: Datapath, ifindexes: Ifindexes) -> None:
        self.dp = dp
        self.ifindexes = ifindexes

    async def update(self, e: Enforced) -> None:
        self.dp.enforce_set(await self.ifindexes.get(e.ifname), e.direction)

    async def delete(self, e: Enforced) -> None:
        idx = await self.ifindexes.find(e.ifname)
        if idx is not None:
            self.dp.enforce_delete(idx, e.direction)

    async def prune(self, rows: Iterable[Enforced]) -> None:
        rows = list(rows)
        idx = await self.ifindexes.resolve(r.ifname for r in rows)
        keep = {(idx[r.ifname], r.direction) for r in rows if r.ifname in idx}
        for item in self.dp.enforce_items():
            if item not in keep:
                self.dp.enforce_delete(*item)


class AttachOps:
    """The programs on every local pod's host veth. Gone pods usually take their filters
    with them; prune detaches from a veth that outlived its row (removed while the agent
    was down)."""

    def __init__(self, dp: Datapath, ifindexes: Ifindexes, uplink: str = "",
                 tunnel: str = "") -> None:
        self.dp = dp
        self.ifindexes = ifindexes
        # an enrolled host's own interfaces (uplink, WireGuard device): directions turned;
        # the tunnel's traffic is judged and tracked as the uplink's
        self.uplink = uplink
        self.tunnel = tunnel
        self.uplinks = frozenset(u for u in (uplink, tunnel) if u)
        self.attached: set[str] = set()  # by this run's update; its delete detaches them

    @property
    def netlink(self) -> Netlink:
        return self.ifindexes.netlink

    async def update(self, a: Attachment) -> None:
        # claimed before the attach, so a prune running meanwhile never detaches it
        self.attached.add(a.ifname)
        try:
            idx = await asyncio.to_thread(attach.attach, a.ifname,
                                          (self.dp.from_pod.fd, self.dp.from_pod.name),
                                          (self.dp.to_pod.fd, self.dp.to_pod.name),
                                          self.netlink, a.ifname in self.uplinks,
                                          ((self.dp.from_pod_l3.fd, self.dp.from_pod_l3.name),
                                           (self.dp.to_pod_l3.fd, self.dp.to_pod_l3.name)))
        except LookupError as e:
            self.attached.discard(a.ifname)
            raise TemporaryError(str(e), delay=1.0) from None
        except BaseException:
            self.attached.discard(a.ifname)
            raise
        self.ifindexes.cache[a.ifname] = idx
        if a.ifname == self.tunnel and self.uplink:
            self.dp.alias_set(idx, await self.ifindexes.get(self.uplink))

    async def delete(self, a: Attachment) -> None:
        # usually the veth is gone already, and its filters with it
        await asyncio.to_thread(attach.detach, a.ifname, self.netlink)
        self.ifindexes.cache.pop(a.ifname, None)
        self.attached.discard(a.ifname)

    async def prune(self, rows: Iterable[Attachment]) -> None:
        # only links this run has not attached are dumped: few, once the first prune is done
        found = await asyncio.to_thread(attach.attached, self.dp.from_pod.name, self.netlink,
                                        frozenset(self.attached))
        keep = {a.ifname for a in rows}  # read after the dump: a row added meanwhile stays
        for ifname in found:
            # and one attached while an earlier detach was awaited stays too
            if ifname not in keep and ifname not in self.attached:
                await asyncio.to_thread(attach.detach, ifname, self.netlink)
                self.ifindexes.cache.pop(ifname, None)


# ---- global service load-balancing (bpf/lb.py, programs/lb.h) --------------------------

class LbFrontendOps:
    """A frontend's entry, written after the backends it names (so a new connection never
    meets an id it cannot resolve); a removed backend is skipped by the datapath until
    its frontend is rewritten."""

    def __init__(self, maps: LbMaps, backends: Table[int, LbBackend]) -> None:
        self.maps = maps
        self.backends = backends

    async def update(self, f: LbFrontend) -> None:
        for bid in f.backend_ids:
            b = self.backends.get(bid)
            if b is not None:
                self.maps.backend_set(b)
        self.maps.service_set(f)

    async def delete(self, f: LbFrontend) -> None:
        self.maps.service_delete(f.key)

    async def prune(self, rows: Iterable[LbFrontend]) -> None:
        keep = {r.key for r in rows}
        for key in self.maps.service_items():
            if key not in keep:
                self.maps.service_delete(key)


class LbBackendOps:
    def __init__(self, maps: LbMaps) -> None:
        self.maps = maps

    async def update(self, b: LbBackend) -> None:
        self.maps.backend_set(b)

    async def delete(self, b: LbBackend) -> None:
        self.maps.backend_delete(b.id)

    async def prune(self, rows: Iterable[LbBackend]) -> None:
        keep = {r.id for r in rows}
        for bid in self.maps.backend_items():
            if bid not in keep:
                self.maps.backend_delete(bid)

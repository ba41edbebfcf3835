"""Cluster-scoped security identity allocation in etcd, race-free across allocators.

An identity is the pair of keys of Cilium's kvstore allocator (pkg/allocator and
pkg/kvstore/allocator): the master key `cilium/state/identities/v1/id/<id>` (the sorted
label string) and the slave key `cilium/state/identities/v1/value/<labels>/<owner>` (the
id), the index by which the same labels always find the same id. Every Plexus allocator of
a cluster writes its slave key under one owner name, so both are created in one
transaction that fails if either exists: two allocators racing for the same labels get
one id; racing for the same id, one of them moves on.

Plexus before this release kept its index at `value/<sha256 of labels>`, a key no Cilium
allocator knows: such a key is still honoured when found, moved to the slave key and
removed.
"""

from __future__ import annotations

import hashlib
import logging
import time

from clustermesh.kvstore import KvStore
from clustermesh.models import (
    IDENTITIES_PREFIX,
    IDENTITY_VALUES_PREFIX,
    InvalidValue,
    format_labels,
    identity_range,
    parse_labels,
)

log = logging.getLogger(__name__)


class IdentitiesExhausted(Exception):
    pass


OWNER = "clustermesh-apiserver"


def value_key(labels: tuple[str, ...], owner: str = OWNER) -> str:
    """Cilium's slave key: `value/<labels>/<owner>`."""
    return f"{IDENTITY_VALUES_PREFIX}/{format_labels(labels)}/{owner}"


def legacy_value_key(labels: tuple[str, ...]) -> str:
    """Where Plexus kept the index before it used Cilium's layout."""
    digest = hashlib.sha256(format_labels(labels).encode()).hexdigest()
    return f"{IDENTITY_VALUES_PREFIX}/{digest}"


class Allocator:
    def __init__(self, kv: KvStore, cluster_id: int, max_connected: int = 255) -> None:
        self.kv = kv
        self.first, self.last = identity_range(cluster_id, max_connected)
        # The lowest ids are reserved for Cilium's fixed identities in every cluster.
        self.first = max(self.first, 256)
        self._cache: dict[tuple[str, ...], int] = {}
        self._next = self.first
        self.allocated = 0  # identities this allocator created in etcd

    async def allocate(self, labels: tuple[str, ...]) -> int:
        labels = tuple(sorted(labels))
        if labels in self._cache:
            return self._cache[labels]
        vkey = value_key(labels)
        for _ in range(1000):
            existing = await self.kv.get(vkey)
            if existing is not None:
                ident = int(existing.value)
                self._cache[labels] = ident
                return ident
            adopted = await self._adopt_legacy(labels, vkey)
            if adopted is not None:
                self._cache[labels] = adopted
                return adopted
            candidate = await self._free_id()
            created = await self.kv.create_many([
                (f"{IDENTITIES_PREFIX}/{candidate}", format_labels(labels)),
                (vkey, str(candidate)),
            ])
            if created:
                self._cache[labels] = candidate
                self.allocated += 1
                log.info("allocated identity=%d labels=%s", candidate, format_labels(labels))
                return candidate
            self._next = candidate + 1  # lost a race for this id or for these labels
        raise IdentitiesExhausted(f"could not allocate an identity for {format_labels(labels)}")

    async def _adopt_legacy(self, labels: tuple[str, ...], vkey: str) -> int | None:
        """The id an older Plexus indexed these labels under, moved to Cilium's slave key."""
        old = await self.kv.get(legacy_value_key(labels))
        if old is None or not old.value.isdigit():
            return None
        ident = int(old.value)
        master = await self.kv.get(f"{IDENTITIES_PREFIX}/{ident}")
        try:
            if master is None or parse_labels(master.value) != labels:
                return None  # the index outlived its identity: allocate afresh
        except InvalidValue:
            return None
        await self.kv.create_many([(vkey, str(ident))])  # lost to a racing allocator: same id
        await self.kv.delete_if_mod_revision(legacy_value_key(labels), old.mod_revision)
        log.info("identity=%d moved to Cilium's index key", ident)
        return ident

    async def _free_id(self) -> int:
        ident = self._next
        while ident <= self.last:
            if await self.kv.get(f"{IDENTITIES_PREFIX}/{ident}") is None:
                self._next = ident
                return ident
            ident += 1
        # wrap once: ids freed by garbage collection below the cursor
        items, _ = await self.kv.list_prefix(f"{IDENTITIES_PREFIX}/")
        used = {int(i.key.rsplit("/", 1)[1]) for i in items if i.key.rsplit("/", 1)[1].isdigit()}
        for ident in range(self.first, self.last + 1):
            if ident not in used:
                return ident
        raise IdentitiesExhausted(f"identity range {self.first}..{self.last} is full")

    async def release(self, ident: int) -> bool:
        """Delete an identity and its index; True when it was there."""
        got = await self.kv.get(f"{IDENTITIES_PREFIX}/{ident}")
        if got is None:
            return False
        labels = parse_labels(got.value)
        self._cache.pop(labels, None)
        for vkey in (value_key(labels), legacy_value_key(labels)):
            idx = await self.kv.get(vkey)
            if idx is not None and idx.value == str(ident).encode():
                await self.kv.delete_if_mod_revision(vkey, idx.mod_revision)
        return await self.kv.delete_if_mod_revision(f"{IDENTITIES_PREFIX}/{ident}", got.mod_revision)

    async def owned(self) -> dict[int, tuple[str, ...]]:
        items, _ = await self.kv.list_prefix(f"{IDENTITIES_PREFIX}/")
        out = {}
        for i in items:
            tail = i.key.rsplit("/", 1)[1]
            if tail.isdigit() and self.first <= int(tail) <= self.last:
                try:
                    out[int(tail)] = parse_labels(i.value)
                except InvalidValue as e:  # left alone: not ours to judge what it names
                    log.warning("identity=%s skipped: %s", tail, e)
        return out


class GarbageCollector:
    """Frees identities no endpoint has used for `grace` seconds."""

    def __init__(self, allocator: Allocator, grace: float) -> None:
        self.allocator = allocator
        self.grace = grace
        self._unused_since: dict[int, float] = {}

    async def collect(self, in_use: set[int], now: float | None = None) -> list[int]:
        now = time.monotonic() if now is None else now
        freed = []
        for ident in await self.allocator.owned():
            if ident in in_use:
                self._unused_since.pop(ident, None)
                continue
            since = self._unused_since.setdefault(ident, now)
            if now - since >= self.grace:
                if await self.allocator.release(ident):
                    freed.append(ident)
                    log.info("garbage-collected identity=%d", ident)
                self._unused_since.pop(ident, None)
        return freed

"""The host's registration: its record under its lease, kept alive while the host lives.

The record (`.../host/node`, its WireGuard key) lives under a lease of the VM's lease time;
a keepalive every third of it keeps it. A host that goes silent loses the lease, etcd
deletes the record, and the apiserver withdraws the host from the cluster (and so from the
mesh); when the host returns it grants a new lease and writes the record again. Before the
first write, and after every refusal, the host checks that its spec still names its
certificate: a bundle that was replaced or revoked is refused with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from clustermesh.kvstore import KvError, KvStore, PermissionDenied
from clustermesh.vms import VmHost, VmSpec, now_rfc3339, vm_joined_key, vm_node_key, vm_spec_key
from plexus.core.log import Fields
from plexus.core.reconciler import Backoff

log = logging.getLogger(__name__)


def _certificate_refused(e: KvError) -> bool:
    text = str(e).upper()
    return "CERTIFICATE" in text or "HANDSHAKE" in text


class Refused(Exception):
    """The cluster does not take this host (not enrolled, other certificate, revoked)."""


@dataclass
class RegistrationStatus:
    state: str = "starting"  # starting, joined, retrying, refused
    lease_id: int = 0
    joined_since: float = 0.0
    renewals: int = 0
    rejoins: int = 0  # leases granted after the first: silences the mesh saw
    last_error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "lease": format(self.lease_id, "x"),
                "joinedSince": self.joined_since, "renewals": self.renewals,
                "rejoins": self.rejoins, "lastError": self.last_error}


class Registration:
    def __init__(self, kv: KvStore, cluster: str, name: str, lease: int, cert_serial: str,
                 wireguard_key: Callable[[], str]) -> None:
        self.kv = kv
        self.cluster = cluster
        self.name = name
        self.lease = lease
        self.cert_serial = cert_serial
        self.wireguard_key = wireguard_key
        self.status = RegistrationStatus()
        self.started = now_rfc3339()
        self.changed = asyncio.Event()  # the record's content changed (a new WireGuard key)
        self.joined = asyncio.Event()
        self.backoff = Backoff(initial=0.2, maximum=min(5.0, lease / 3))
        self.attempt = 0
        self.log = Fields(log, {"vm": name, "cluster": cluster})

    async def check_spec(self) -> VmSpec:
        try:
            item = await self.kv.get(vm_spec_key(self.cluster, self.name))
        except PermissionDenied as e:
            raise Refused(f"cluster {self.cluster}'s etcd refuses this VM's certificate ({e}): "
                          "it was revoked (`plexus vm delete`)") from None
        if item is None:
            raise Refused(f"VM {self.name} is not enrolled in cluster {self.cluster} "
                          "(deleted? `plexus vm create` makes a new bundle)")
        spec = VmSpec.from_json(item.value)
        if self.cert_serial and spec.cert_serial != self.cert_serial:
            raise Refused(f"VM {self.name} was enrolled again with another certificate "
                          f"({spec.cert_serial}); this bundle ({self.cert_serial}) is no longer valid")
        return spec

    def record(self) -> str:
        return VmHost(wireguard_pubkey=self.wireguard_key(), started=self.started).to_json()

    async def _join(self) -> int:
        await self.check_spec()
        lease = await self.kv.grant(self.lease)
        await self.kv.put(vm_node_key(self.cluster, self.name), self.record(), lease=lease)
        await self.kv.create(vm_joined_key(self.cluster, self.name), now_rfc3339())
        return lease

    async def run(self) -> None:
        """Join, keep the lease, rejoin when it was lost; until cancelled."""
        first = True
        while True:
            try:
                lease = await self._join()
            except (Refused, PermissionDenied) as e:
                self._failed("refused", str(e))
                await self._pause()
                continue
            except KvError as e:
                if _certificate_refused(e):
                    self._failed("refused", f"cluster {self.cluster}'s etcd refused this VM's "
                                            "certificate in the TLS handshake: revoked, expired "
                                            f"or not the cluster's ({str(e)[:200]})")
                else:  # a revoked or expired certificate is closed after the handshake
                    self._failed("retrying", f"etcd: {e} (unreachable, or this VM's "
                                             "certificate was revoked or expired)")
                await self._pause()
                continue
            self.attempt = 0
            st = self.status
            st.lease_id, st.state, st.joined_since, st.last_error = lease, "joined", time.time(), ""
            if not first:
                st.rejoins += 1
            first = False
            self.joined.set()
            self.log.info("joined: record written under lease %x (%ds)", lease, self.lease)
            await self._keep(lease)
            self.joined.clear()

    async def _keep(self, lease: int) -> None:
        """Refresh the lease until it is lost; rewrite the record when it changes."""
        interval = self.lease / 3
        while True:
            try:
                await asyncio.wait_for(self.changed.wait(), interval)
                self.changed.clear()
                await self.kv.put(vm_node_key(self.cluster, self.name), self.record(), lease=lease)
                self._recovered()
                continue
            except TimeoutError:
                pass
            except PermissionDenied as e:
                self._failed("refused", str(e))
                return
            except KvError as e:
                self._failed("retrying", f"etcd: {e}")
                await self._pause()
                continue  # the lease may still live: try again within it
            try:
                ttl = await self.kv.keepalive_once(lease)
            except KvError as e:
                self._failed("retrying", f"etcd: {e}")
                await self._pause()
                continue
            if ttl <= 0:
                self._failed("retrying", "lease expired: the mesh withdrew this host; rejoining")
                return
            self.status.renewals += 1
            self._recovered()

    def _recovered(self) -> None:
        """The lease outlived an etcd outage (etcd extends leases across a leader change)."""
        if self.status.state != "joined":
            self.log.info("joined again: lease %x kept", self.status.lease_id)
        self.status.state, self.status.last_error = "joined", ""
        self.attempt = 0

    async def _pause(self) -> None:
        self.attempt += 1
        await asyncio.sleep(self.backoff.delay(self.attempt))

    def _failed(self, state: str, why: str) -> None:
        if self.status.last_error != why:
            (self.log.error if state == "refused" else self.log.warning)("%s: %s", state, why)
        self.status.state, self.status.last_error = state, why

    async def leave(self) -> None:
        """Withdraw at once (not on stop: a stopped agent keeps its lease until it runs out)."""
        if self.status.lease_id:
            await self.kv.revoke(self.status.lease_id)

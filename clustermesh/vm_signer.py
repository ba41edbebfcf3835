"""Renews enrolled VMs' certificates: the cluster side, next to the apiserver, with the CA key.

A VM whose certificate has used half its lifetime writes a new public key to its
`host/renew` (only its own etcd user may); the signer certifies that key for the VM's user
(`vm-<name>`, valid the spec's `ttl`), writes the certificate to the VM's `issued` key (only
the VM reads it) and the new serial into the spec. The private key never leaves the VM. A
request for a VM that is not enrolled, or that comes before half of the current
certificate's lifetime, is refused and counted: a VM cannot mint certificates at will.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from clustermesh.apiserver_module import APISERVER
from clustermesh.kvstore import KvError, KvStore
from clustermesh.models import InvalidValue, decode_json
from clustermesh.pki import certify
from clustermesh.session import run_sessions
from clustermesh.vms import (
    VMS_PREFIX,
    VmSpec,
    parse_time,
    parse_vm_key,
    rfc3339,
    vm_issued_key,
    vm_spec_key,
    vm_user,
)
from clustermesh.watch import Changed, ListWatch, Relisted
from plexus.core.config import Strict
from plexus.core.log import Fields
from plexus.core.module import Hive, Module
from plexus.core.reconciler import Backoff

log = logging.getLogger(__name__)


class VmSignerConfig(Strict):
    """Renewing enrolled VMs' certificates needs the cluster CA's key."""

    pki: Path | None = Field(None, description="The cluster's PKI directory (ca.key); none: off.")


class VmSigner:
    def __init__(self, kv: KvStore, cluster: str, pki: Path) -> None:
        self.kv = kv
        self.cluster = cluster
        self.pki = pki
        self.watch = ListWatch(kv, f"{VMS_PREFIX}/{cluster}/")
        self.specs: dict[str, tuple[VmSpec, bytes]] = {}  # name -> (spec, its raw value)
        self.requests: dict[str, str] = {}  # name -> public key PEM asked for
        self.issued_for: dict[str, str] = {}  # name -> public key PEM last certified
        self.renewed = 0
        self.refused: dict[str, str] = {}  # name -> why its request was not served
        self.log = Fields(log, {"cluster": cluster})
        self._dirty = asyncio.Event()

    async def run(self) -> None:
        await run_sessions(self._session, backoff=Backoff(initial=0.5, maximum=30.0),
                           failed=lambda e: self.log.warning("vm signer: etcd: %s", e),
                           crashed=lambda e: self.log.error("vm signer failed", exc_info=e),
                           started=lambda: None, progressed=lambda: True, ended=lambda: None)

    async def _session(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow())
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                for name in list(self.requests):
                    await self._serve(name)

    async def _follow(self) -> None:
        async for update in self.watch.updates():
            if isinstance(update, Relisted):
                for key in update.vanished:
                    self._apply(key, None)
                for item in update.items:
                    self._apply(item.key, item.value)
            elif isinstance(update, Changed):
                for ev in update.events:
                    self._apply(ev.key, ev.value if ev.kind == "put" else None)
            self._dirty.set()

    def _apply(self, key: str, value: bytes | None) -> None:
        parsed = parse_vm_key(self.cluster, key)
        if parsed is None:
            return
        name, what = parsed
        try:
            if what == "spec":
                self.specs.pop(name, None)
                if value is not None:
                    self.specs[name] = (VmSpec.from_json(value), value)
            elif what == "renew":
                self.requests.pop(name, None)
                if value is not None:
                    obj = decode_json(value, f"renewal request of VM {name}")
                    pem = obj.get("publicKey") if isinstance(obj, dict) else None
                    if not isinstance(pem, str):
                        raise InvalidValue("publicKey must be a PEM string")
                    self.requests[name] = pem
            elif what == "issued" and value is not None:
                obj = decode_json(value, f"certificate issued to VM {name}")
                if isinstance(obj, dict) and isinstance(obj.get("publicKey"), str):
                    self.issued_for[name] = obj["publicKey"]
        except (InvalidValue, ValueError) as e:
            self._refuse(name, str(e))

    def _refuse(self, name: str, why: str) -> None:
        if self.refused.get(name) != why:
            self.log.warning("renewal for VM %s refused: %s", name, why)
        self.refused[name] = why

    async def _serve(self, name: str) -> None:
        pem = self.requests.get(name)
        if pem is None or self.issued_for.get(name) == pem:
            return
        found = self.specs.get(name)
        if found is None:
            return self._refuse(name, "not enrolled")
        spec, raw = found
        now = datetime.datetime.now(datetime.UTC)
        if spec.expires:
            expires = parse_time(spec.expires, f"VM {name}: expires")
            if now < expires - datetime.timedelta(seconds=spec.ttl / 2):
                return self._refuse(name, f"its certificate is valid until {spec.expires}: "
                                          "renewed only in the second half of its lifetime")
        ttl = datetime.timedelta(seconds=spec.ttl)
        try:
            cert, serial = certify(self.pki, vm_user(name), self.cluster, pem.encode(), ttl)
        except ValueError as e:
            return self._refuse(name, f"publicKey: {e}")
        issued = json.dumps({"cert": cert.decode(), "serial": format(serial, "x"),
                             "publicKey": pem})
        renewed = dataclasses.replace(spec, cert_serial=format(serial, "x"),
                                      expires=rfc3339(now + ttl))
        try:
            await self.kv.put(vm_issued_key(self.cluster, name), issued)
            if not await self.kv.put_if_value(vm_spec_key(self.cluster, name), raw,
                                              renewed.to_json()):
                return  # the spec changed meanwhile (deleted, enrolled again): its event follows
        except KvError as e:
            self.log.warning("renewal for VM %s: etcd: %s", name, e)
            self._dirty.set()
            return
        self.issued_for[name] = pem
        self.refused.pop(name, None)
        self.renewed += 1
        self.log.info("VM %s: certificate renewed (%x, until %s)", name, serial, renewed.expires)

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "renewed": self.renewed, "refused": dict(self.refused)}


class VmSignerComponent:
    def __init__(self, hive: Hive, config: VmSignerConfig) -> None:
        self.hive = hive
        self.signer: VmSigner | None = None
        if config.pki is not None:
            server = hive.require(APISERVER)
            self.signer = VmSigner(server.kv, server.cluster, config.pki)

    async def start(self) -> None:
        if self.signer is not None:
            self.hive.spawn("vmsigner", self.signer.run(), "run")

    async def stop(self) -> None:
        await self.hive.cancel_tasks("vmsigner")

    def status(self) -> dict[str, Any]:
        return self.signer.status() if self.signer is not None else {"enabled": False}


module = Module(name="vmsigner", doc=__doc__ or "", config=VmSignerConfig,
                build=lambda hive, cfg: VmSignerComponent(hive, cfg))

"""VM enrolment, host side: this host registers itself as an enrolled VM of its cluster.

The host runs the node agent's modules (clustermesh to learn every cluster, encryption for
its WireGuard peers, bpf) with this one added: it keeps the host's record, carrying the
WireGuard key, alive under the VM's lease, with the VM's own certificate, which may write
nothing but that record. Address, labels and identity are the operator's (the spec), never
the host's. Stop is not remove: the record lives on until its lease runs out.
"""

from __future__ import annotations

import logging
from typing import Any

from clustermesh.kvstore import KvStore, Tls
from plexus.core.api import ApiError
from plexus.core.module import Hive, Module
from plexus.core.node import ENDPOINTS, LOCAL_NODE, NODE_ATTRIBUTES, WIREGUARD_PUBLIC_KEY, Endpoint
from vmagent.config import VmAgentConfig
from vmagent.registration import Registration
from vmagent.renewal import Renewal, cert_serial

log = logging.getLogger(__name__)

HOST_ENDPOINT = "host"  # the endpoint's key: the host itself
HOST_TUNNEL_ENDPOINT = "host-wireguard"  # the host again, as its WireGuard device sees it


class VmAgent:
    def __init__(self, hive: Hive, config: VmAgentConfig) -> None:
        self.hive = hive
        self.config = config
        self.local = hive.require(LOCAL_NODE)
        self.attributes = hive.require(NODE_ATTRIBUTES)
        self.endpoints = hive.require(ENDPOINTS)
        self.kv: KvStore | None = None
        self.registration: Registration | None = None
        self.renewal: Renewal | None = None
        hive.routes.get("/v1/vm", self._api)

    async def start(self) -> None:
        if not self.config.enabled:
            return
        e = self.config.etcd
        if not e.endpoints or e.cert_file is None or e.key_file is None or e.trusted_ca_file is None:
            raise ValueError("vmagent.etcd: endpoints, trustedCaFile, certFile and keyFile are "
                             "required when vmagent is enabled")
        self.kv = KvStore(e.endpoints, Tls(e.trusted_ca_file, e.cert_file, e.key_file))
        # The host is its own endpoint, on its uplink: the datapath enforces the policies
        # that select its labels there; and on its WireGuard device, where pods' traffic
        # arrives decrypted (the uplink sees only its encrypted packets).
        for key, ifname in ((HOST_ENDPOINT, self.config.uplink),
                            (HOST_TUNNEL_ENDPOINT, self.config.tunnel)):
            if ifname:
                self.endpoints.upsert(Endpoint(
                    container_id=key, ip=self.local.ip, namespace=self.config.namespace,
                    pod_name=self.local.name, labels=dict(self.local.labels),
                    host_ifname=ifname, ifname=ifname))
        self.registration = Registration(
            self.kv, self.local.cluster, self.local.name, self.config.lease,
            cert_serial(e.cert_file), lambda: self.attributes.get(WIREGUARD_PUBLIC_KEY) or "")
        self.renewal = Renewal(self.kv, self.local.cluster, self.local.name, e.trusted_ca_file,
                               e.cert_file, e.key_file, self._renewed)
        self.hive.spawn("vmagent", self._register(), "registration")
        self.hive.spawn("vmagent", self.renewal.run(), "renewal")

    def _renewed(self, serial: str) -> None:
        if self.registration is not None:
            self.registration.cert_serial = serial

    async def _register(self) -> None:
        # The WireGuard key goes into the record: wait until the encryption module set it.
        await self.attributes.initialized.wait()
        assert self.registration is not None
        self.hive.spawn("vmagent", self._follow_attributes(), "attributes")
        await self.registration.run()

    async def _follow_attributes(self) -> None:
        assert self.registration is not None
        async for _ in self.attributes.watch():
            self.registration.changed.set()

    async def stop(self) -> None:
        # Stop is not remove: the record stays until its lease runs out.
        await self.hive.cancel_tasks("vmagent")
        if self.kv is not None:
            await self.kv.close()

    def status(self) -> dict[str, Any]:
        if self.registration is None:
            return {"enabled": self.config.enabled}
        return {"enabled": True, "name": self.local.name, "cluster": self.local.cluster,
                "ip": self.local.ip, "lease": self.config.lease,
                **self.registration.status.as_dict(),
                "certificate": ({"notAfter": self.renewal.status.not_after,
                                 "renewals": self.renewal.status.renewals,
                                 "lastError": self.renewal.status.last_error}
                                if self.renewal is not None else {})}

    async def _api(self, _q: dict[str, str], _b: Any) -> Any:
        if self.registration is None:
            raise ApiError(404, "this agent is not an enrolled VM")
        return self.status()


module = Module(name="vmagent", doc=__doc__ or "", config=VmAgentConfig,
                build=lambda hive, cfg: VmAgent(hive, cfg))

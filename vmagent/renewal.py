"""The host renews its own certificate before it expires.

Once half of the certificate's lifetime has passed, the host makes a new key, asks for it to
be certified (`host/renew`: the public key only), waits for the cluster's signer to write the
certificate to its `issued` key, checks it (the cluster CA's, for this VM, for this key) and
swaps key and certificate files in place. Every etcd client of the agent reconnects with them
when its connection is next made (`clustermesh.kvstore` reloads changed files); open
connections go on, as etcd checks a certificate only at the handshake.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clustermesh.kvstore import KvError, KvStore
from clustermesh.models import InvalidValue
from clustermesh.vms import DEFAULT_TTL, VmSpec, vm_issued_key, vm_renew_key, vm_spec_key, vm_user
from plexus.core.log import Fields

log = logging.getLogger(__name__)


def cert_serial(cert_file: Path) -> str:
    return format(x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number, "x")


@dataclass
class RenewalStatus:
    renewals: int = 0
    not_after: str = ""
    last_error: str = ""


class Renewal:
    def __init__(self, kv: KvStore, cluster: str, name: str, ca_file: Path, cert_file: Path,
                 key_file: Path, renewed: Callable[[str], None], poll: float = 1.0) -> None:
        self.kv = kv
        self.cluster = cluster
        self.name = name
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self.renewed = renewed  # called with the new serial
        self.poll = poll
        self.wait_for_issue = 60.0
        self.status = RenewalStatus()
        self.log = Fields(log, {"vm": name, "cluster": cluster})

    def _cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes())

    async def due(self) -> datetime.datetime:
        """Half-way through the certificate's lifetime, the spec's `ttl` (its start is set
        back a few minutes for clocks that lag): the signer serves no earlier."""
        ttl = datetime.timedelta(seconds=DEFAULT_TTL)
        try:
            item = await self.kv.get(vm_spec_key(self.cluster, self.name))
            if item is not None:
                ttl = datetime.timedelta(seconds=VmSpec.from_json(item.value).ttl)
        except (KvError, InvalidValue) as e:
            self.log.warning("reading the spec for its ttl: %s", e)
        return self._cert().not_valid_after_utc - ttl / 2

    async def run(self) -> None:
        while True:
            cert = self._cert()
            self.status.not_after = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            wait = (await self.due() - datetime.datetime.now(datetime.UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, 600))
                continue
            try:
                await self.renew_once()
            except (KvError, ValueError) as e:
                self.status.last_error = str(e)[:300]
                self.log.warning("certificate renewal failed: %s", e)
                await asyncio.sleep(max(self.poll, 5.0))

    async def renew_once(self) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        await self.kv.put(vm_renew_key(self.cluster, self.name), json.dumps({"publicKey": pem}))
        deadline = asyncio.get_running_loop().time() + self.wait_for_issue
        while True:
            item = await self.kv.get(vm_issued_key(self.cluster, self.name))
            if item is not None:
                issued = json.loads(item.value)
                if isinstance(issued, dict) and issued.get("publicKey") == pem:
                    break
            if asyncio.get_running_loop().time() > deadline:
                raise ValueError(f"no certificate issued within {self.wait_for_issue:.0f} s (is the "
                                 "cluster's signer running: clustermesh-apiserver --vm-pki?)")
            await asyncio.sleep(self.poll)
        cert_pem = str(issued.get("cert", "")).encode()
        self._check(cert_pem, key)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _replace(self.key_file, key_pem)
        _replace(self.cert_file, cert_pem)
        await self.kv.close()  # its next call connects with the new certificate
        serial = cert_serial(self.cert_file)
        self.status.renewals += 1
        self.status.last_error = ""
        self.renewed(serial)
        self.log.info("certificate renewed: %s", serial)
        return serial

    def _check(self, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("the issued certificate is not the cluster CA's") from None
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cn or cn[0].value != vm_user(self.name):
            raise ValueError("the issued certificate is for another VM")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                key.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise ValueError("the issued certificate is for another key")


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

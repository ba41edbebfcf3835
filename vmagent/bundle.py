"""The join bundle: everything a VM needs to join its cluster, signed by the cluster CA.

`plexus vm create` writes it (mode 0600: it holds the VM's private key); `plexus vm join`
reads it and refuses, naming the file and the field, a bundle that was changed after it
was signed, whose certificate is not the cluster CA's, is made for another VM, has expired,
or whose key does not belong to its certificate. A bundle whose CA was swapped and signed
again is refused by etcd itself: its certificate is not one of the cluster CA's.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import Field, field_validator

from clustermesh.models import InvalidValue, check_cluster_name
from clustermesh.vms import DEFAULT_LEASE, check_labels, check_vm_name, vm_user
from plexus.core.config import ConfigError, Strict, parse, read_yaml

T = TypeVar("T")


class EtcdAccess(Strict):
    endpoints: list[str] = Field(min_length=1, description="The cluster's etcd (or a remote's endpoint).")
    ca: str = Field(description="The CA certificate (PEM) that signed the server's certificate.")
    cert: str = Field(description="The client certificate (PEM) for this VM alone.")
    key: str = Field(description="The client certificate's private key (PEM).")


class Bundle(Strict):
    """What `plexus vm create` hands to the VM."""

    api_version: Literal["plexus.io/v1"] = "plexus.io/v1"
    kind: Literal["VMJoinBundle"] = "VMJoinBundle"
    name: str = Field(description="The VM's name in its cluster.")
    cluster: str = Field(description="The cluster the VM joins.")
    cluster_id: int = Field(ge=1, le=255, alias="clusterID")
    ip: ipaddress.IPv4Address = Field(description="The VM's address.")
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    lease: int = Field(DEFAULT_LEASE, ge=2, le=3600, description="Seconds of silence before withdrawal.")
    expires: str = Field(description="When the certificate expires (RFC 3339).")
    etcd: EtcdAccess
    remotes: dict[str, EtcdAccess] = Field(default_factory=dict,
                                           description="Every other cluster of the mesh, by name.")
    signature: str = Field("", description="The cluster CA's ECDSA signature of the rest (base64).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _checked(check_vm_name, v)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        return _checked(check_cluster_name, v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _checked(check_labels, v)

    @field_validator("remotes")
    @classmethod
    def _remotes(cls, v: dict[str, EtcdAccess]) -> dict[str, EtcdAccess]:
        for name in v:
            _checked(check_cluster_name, name)
        return v

    def signed_bytes(self) -> bytes:
        """The canonical form the signature covers: every field but the signature."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _checked(check: Callable[[T], T], v: T) -> T:
    try:
        return check(v)
    except InvalidValue as e:
        raise ValueError(str(e)) from None


def write_bundle(path: Path, bundle: Bundle) -> None:
    """Write 0600 from the first byte: the file holds the VM's private key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bundle.to_yaml())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def sign_bundle(bundle: Bundle, sign: Any) -> Bundle:
    """`sign(bytes) -> signature bytes` (the cluster CA's key, `clustermesh.pki.sign`)."""
    sig = base64.b64encode(sign(bundle.signed_bytes())).decode()
    return bundle.model_copy(update={"signature": sig})


def load_bundle(path: Path, *, name: str | None = None,
                now: datetime.datetime | None = None) -> Bundle:
    """Read and check a bundle; ConfigError names the file and the field of any problem."""
    src = str(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(src, [f"cannot read: {e.strerror}"]) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(src, [f"mode {stat.S_IMODE(mode):04o} lets others read the VM's "
                                "private key: chmod 600 it"])
    bundle = parse(Bundle, read_yaml(path), src)
    verify(bundle, src, name=name, now=now)
    return bundle


def verify(bundle: Bundle, src: str, *, name: str | None = None,
           now: datetime.datetime | None = None) -> None:
    def fail(field: str, why: str) -> ConfigError:
        return ConfigError(src, [f"{field}: {why}"])

    try:
        ca = x509.load_pem_x509_certificate(bundle.etcd.ca.encode())
    except ValueError:
        raise fail("etcd.ca", "not a PEM certificate") from None
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise fail("etcd.ca", "not an ECDSA certificate authority")
    try:
        signature = base64.b64decode(bundle.signature, validate=True)
    except ValueError:
        raise fail("signature", "not base64") from None
    try:
        ca_key.verify(signature, bundle.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise fail("signature", "does not match the bundle: it was changed after it was made, "
                                "or not made by this cluster's CA") from None
    try:
        cert = x509.load_pem_x509_certificate(bundle.etcd.cert.encode())
    except ValueError:
        raise fail("etcd.cert", "not a PEM certificate") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise fail("etcd.cert", "not issued by the bundle's CA") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    want = vm_user(bundle.name)
    if not cn or cn[0].value != want:
        got = cn[0].value if cn else "(none)"
        raise fail("etcd.cert", f"made for {got!r}, not for VM {bundle.name!r} ({want})")
    if name is not None and name != bundle.name:
        raise fail("name", f"this bundle is for VM {bundle.name!r}, not {name!r}")
    t = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= t:
        raise fail("etcd.cert", f"expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}: "
                                "make a new bundle with `plexus vm create`")
    if cert.not_valid_before_utc > t:
        raise fail("etcd.cert", "not valid yet (is this host's clock right?)")
    try:
        key = serialization.load_pem_private_key(bundle.etcd.key.encode(), None)
    except (ValueError, TypeError):
        raise fail("etcd.key", "not an unencrypted PEM private key") from None
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != cert.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        raise fail("etcd.key", "does not belong to etcd.cert")


def cert_serial(bundle: Bundle) -> str:
    return format(x509.load_pem_x509_certificate(bundle.etcd.cert.encode()).serial_number, "x")

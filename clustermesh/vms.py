"""Enrolled VMs and metal hosts in a cluster's etcd: keys, records and the VM's etcd role.

Under `plexus/vms/v1/<cluster>/<name>/`:

| key | written by | value |
|---|---|---|
| `spec` | the operator (`plexus vm create`) | `VmSpec`: address, labels, lease, its certificate |
| `host/node` | the VM, under its lease | `VmHost`: its WireGuard key; gone when the VM is silent |
| `host/joined` | the VM, once | the time it first joined (so a silent VM shows as lost, not pending) |
| `host/renew` | the VM, before its certificate expires | `{"publicKey": PEM}`: the key to certify |
| `issued` | the cluster's signer | `{"cert": PEM, "serial": hex}`: the VM's renewed certificate |

The VM's etcd user (the CN of its certificate) may write `host/` of its own VM and nothing
else; it reads its own spec and what a remote cluster reads. The apiserver publishes a VM
(node record and ipcache entry, identity from the spec's labels) only while both its spec
and its `host/node` exist, and takes address and labels from the spec alone: a VM cannot
claim another address or other labels.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from clustermesh.kvstore import Grant
from clustermesh.models import (
    CLUSTER_CONFIG_PREFIX,
    HEARTBEAT_KEY,
    PLEXUS_PREFIX,
    SYNCED_PREFIX,
    InvalidValue,
    decode_json,
)

VMS_PREFIX = f"{PLEXUS_PREFIX}/vms/v1"
VM_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
VM_USER_PREFIX = "vm-"  # etcd user and role, and the certificate's CN: vm-<name>
VM_NODE_LABEL = "plexus.io/vm"  # on the VM's node record, so nodes can tell it from a node
DEFAULT_LEASE = 30
DEFAULT_TTL = 86400  # seconds a VM's certificate is valid, the first and each renewed one
MAX_LABELS = 64
LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def check_vm_name(name: str) -> str:
    if not isinstance(name, str) or not VM_NAME_RE.match(name):
        raise InvalidValue(f"VM name {name!r} must be 1-63 lower-case alphanumerics and '-', "
                           "starting and ending with an alphanumeric")
    return name


def check_labels(labels: Any, what: str = "labels") -> dict[str, str]:
    if not isinstance(labels, dict):
        raise InvalidValue(f"{what}: expected a map of strings")
    if len(labels) > MAX_LABELS:
        raise InvalidValue(f"{what}: {len(labels)} labels, at most {MAX_LABELS}")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY_RE.match(k):
            raise InvalidValue(f"{what}: key {k!r} is not a label key")
        if not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
            raise InvalidValue(f"{what}: value {v!r} of {k} is not a label value")
    return dict(labels)


def vm_user(name: str) -> str:
    return f"{VM_USER_PREFIX}{name}"


def vm_prefix(cluster: str, name: str) -> str:
    return f"{VMS_PREFIX}/{cluster}/{name}/"


def vm_spec_key(cluster: str, name: str) -> str:
    return f"{vm_prefix(cluster, name)}spec"


def vm_host_prefix(cluster: str, name: str) -> str:
    return f"{vm_prefix(cluster, name)}host/"


def vm_node_key(cluster: str, name: str) -> str:
    return f"{vm_host_prefix(cluster, name)}node"


def vm_joined_key(cluster: str, name: str) -> str:
    return f"{vm_host_prefix(cluster, name)}joined"


def vm_renew_key(cluster: str, name: str) -> str:
    return f"{vm_host_prefix(cluster, name)}renew"


def vm_issued_key(cluster: str, name: str) -> str:
    return f"{vm_prefix(cluster, name)}issued"


def parse_vm_key(cluster: str, key: str) -> tuple[str, str] | None:
    """(name, what) of a key under the cluster's VM prefix: spec, issued, node, joined, renew."""
    rest = key.removeprefix(f"{VMS_PREFIX}/{cluster}/")
    if rest == key:
        return None
    name, _, what = rest.partition("/")
    if what in ("spec", "issued"):
        return name, what
    if what in ("host/node", "host/joined", "host/renew"):
        return name, what.removeprefix("host/")
    return None


def remote_reads(cluster: str) -> list[Grant]:
    """What a remote cluster (and so an enrolled VM) may read of `cluster`'s etcd."""
    return [Grant("read", "cilium/state/", prefix=True),
            Grant("read", f"{CLUSTER_CONFIG_PREFIX}/{cluster}"),
            Grant("read", f"{SYNCED_PREFIX}/{cluster}/", prefix=True),
            Grant("read", HEARTBEAT_KEY),
            Grant("read", "plexus/manifests/v1/", prefix=True)]


def vm_grants(cluster: str, name: str) -> list[Grant]:
    """The VM's role: its own spec read, its own `host/` written, the shared state read."""
    return [*remote_reads(cluster),
            Grant("read", vm_spec_key(cluster, name)),
            Grant("read", vm_issued_key(cluster, name)),
            Grant("readwrite", vm_host_prefix(cluster, name), prefix=True)]


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, what: str) -> datetime.datetime:
    if not isinstance(value, str):
        raise InvalidValue(f"{what}: expected an RFC 3339 time")
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidValue(f"{what}: {value!r} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise InvalidValue(f"{what}: {value!r} has no time zone")
    return t


@dataclass(frozen=True)
class VmSpec:
    """What the operator enrolled: `plexus/vms/v1/<cluster>/<name>/spec`."""

    name: str
    cluster: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    lease: int = DEFAULT_LEASE
    cert_serial: str = ""  # hex; a bundle whose certificate is another is not this VM's
    expires: str = ""  # RFC 3339: when the join certificate expires
    created: str = ""
    ttl: int = DEFAULT_TTL

    @property
    def user(self) -> str:
        return vm_user(self.name)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "cluster": self.cluster, "ip": self.ip,
                           "labels": self.labels, "namespace": self.namespace,
                           "lease": self.lease, "certSerial": self.cert_serial,
                           "expires": self.expires, "created": self.created, "ttl": self.ttl})

    @classmethod
    def from_json(cls, raw: bytes | str) -> VmSpec:
        what = "VM spec"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        name = check_vm_name(_str(obj, "name", what))
        what = f"VM {name!r}"
        lease = obj.get("lease", DEFAULT_LEASE)
        if not isinstance(lease, int) or isinstance(lease, bool) or not 2 <= lease <= 3600:
            raise InvalidValue(f"{what}: lease must be 2..3600 seconds")
        try:
            ip = str(ipaddress.ip_address(_str(obj, "ip", what)))
        except ValueError:
            raise InvalidValue(f"{what}: ip {obj['ip']!r} is not an IP address") from None
        ttl = obj.get("ttl", DEFAULT_TTL)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 10 <= ttl <= 10 * 365 * 86400:
            raise InvalidValue(f"{what}: ttl must be 10 s to 10 years")
        return cls(name=name, cluster=_str(obj, "cluster", what), ip=ip, ttl=ttl,
                   labels=check_labels(obj.get("labels", {}), f"{what}: labels"),
                   namespace=_str(obj, "namespace", what, "default"), lease=lease,
                   cert_serial=_str(obj, "certSerial", what, ""),
                   expires=_str(obj, "expires", what, ""), created=_str(obj, "created", what, ""))


@dataclass(frozen=True)
class VmHost:
    """What the VM says of itself: `.../host/node`, under its lease."""

    wireguard_pubkey: str = ""
    started: str = ""

    def to_json(self) -> str:
        return json.dumps({"wireguardPubKey": self.wireguard_pubkey, "started": self.started})

    @classmethod
    def from_json(cls, raw: bytes | str) -> VmHost:
        what = "VM host record"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        key = _str(obj, "wireguardPubKey", what, "")
        if key and not re.fullmatch(r"[A-Za-z0-9+/]{43}=", key):
            raise InvalidValue(f"{what}: wireguardPubKey is not a WireGuard public key")
        return cls(wireguard_pubkey=key, started=_str(obj, "started", what, ""))


def _str(obj: dict[str, Any], name: str, what: str, default: str | None = None) -> str:
    v = obj.get(name, default)
    if not isinstance(v, str):
        raise InvalidValue(f"{what}: {name} must be a string")
    if any(ord(c) < 0x20 for c in v):
        raise InvalidValue(f"{what}: {name} contains control characters")
    return v


def now_rfc3339() -> str:
    return rfc3339(datetime.datetime.now(datetime.UTC))

"""The operator's side: enrol a VM in its cluster, list the enrolled, revoke one.

Runs with the cluster's admin access (root etcd user, the cluster CA's key). Enrolling makes
the VM's etcd user and role (`clustermesh.vms.vm_grants`), issues its certificate and writes
its spec; any failure on the way undoes what was made, so nothing is left half enrolled.
Revoking deletes the user and its role (etcd refuses its every request from then on), puts
the certificate on the CA's revocation list (etcd refuses its handshakes), revokes its lease
and deletes its keys, so the apiserver withdraws it from the cluster and so from the mesh.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.kvstore import KvError, KvStore
from clustermesh.models import (
    CLUSTER_CONFIG_PREFIX,
    IPCACHE_PREFIX,
    NODES_PREFIX,
    ClusterConfig,
    InvalidValue,
    IPIdentity,
    check_cluster_name,
)
from clustermesh.pki import issue_client, revoked_serials, sign, write_crl
from clustermesh.vms import (
    DEFAULT_LEASE,
    VMS_PREFIX,
    VmSpec,
    check_labels,
    check_vm_name,
    now_rfc3339,
    parse_vm_key,
    rfc3339,
    vm_grants,
    vm_node_key,
    vm_prefix,
    vm_spec_key,
    vm_user,
)
from vmagent.bundle import Bundle, EtcdAccess, sign_bundle

log = logging.getLogger(__name__)


class EnrolError(Exception):
    """An enrolment refused or failed; the message says what and what was left unchanged."""


@dataclass
class ClusterAdmin:
    """Admin access to one cluster: its etcd (as root) and its PKI directory (with ca.key)."""

    cluster: str
    kv: KvStore
    pki: Path
    advertise: list[str]  # the etcd endpoints a VM reaches
    remotes: dict[str, EtcdAccess] = field(default_factory=dict)


def parse_labels(text: str) -> dict[str, str]:
    """`app=db,env=prod` -> {"app": "db", "env": "prod"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep:
            raise EnrolError(f"--labels: {part!r} is not key=value")
        if k in out:
            raise EnrolError(f"--labels: {k} given twice")
        out[k] = v
    try:
        return check_labels(out, "--labels")
    except InvalidValue as e:
        raise EnrolError(str(e)) from None


def parse_duration(text: str) -> datetime.timedelta:
    """`24h`, `90m`, `30s`, `7d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise EnrolError(f"--ttl: {text!r} is not a duration such as 24h, 90m or 7d") from None
    if value <= 0:
        raise EnrolError(f"--ttl: {text!r} must be positive")
    return datetime.timedelta(seconds=value * unit)


def remote_access(pki_dir: Path) -> EtcdAccess:
    """How a VM reads a remote cluster: its read-only endpoint with its `remote` certificate."""
    endpoints = [e for e in (pki_dir / "endpoints").read_text().split() if e]
    return EtcdAccess(endpoints=endpoints, ca=(pki_dir / "ca.crt").read_text(),
                      cert=(pki_dir / "remote.crt").read_text(),
                      key=(pki_dir / "remote.key").read_text())


async def _cluster_id(kv: KvStore, cluster: str) -> int:
    item = await kv.get(f"{CLUSTER_CONFIG_PREFIX}/{cluster}")
    if item is None:
        raise EnrolError(f"cluster {cluster} has no cluster-config in its etcd: is its "
                         "clustermesh-apiserver running?")
    return ClusterConfig.from_json(item.value).id


async def create(admin: ClusterAdmin, name: str, ip: str, labels: dict[str, str], *,
                 namespace: str = "default", ttl: datetime.timedelta = datetime.timedelta(hours=24),
                 lease: int = DEFAULT_LEASE, not_before: datetime.datetime | None = None) -> Bundle:
    """Enrol `name`; returns its signed bundle. `not_before` only makes expired bundles (tests)."""
    c = admin.cluster
    try:
        check_vm_name(name)
        check_cluster_name(c)
        addr = str(ipaddress.IPv4Address(ip))
    except InvalidValue as e:
        raise EnrolError(str(e)) from None
    except ValueError:
        raise EnrolError(f"--ip: {ip!r} is not an IPv4 address") from None
    if not 2 <= lease <= 3600:
        raise EnrolError(f"--lease: {lease} must be 2..3600 seconds")
    kv = admin.kv
    cluster_id = await _cluster_id(kv, c)
    if await kv.get(vm_spec_key(c, name)) is not None:
        raise EnrolError(f"VM {name} is already enrolled in cluster {c}: `plexus vm delete {name}` "
                         "first (nothing was changed)")
    if await kv.get(f"{NODES_PREFIX}/{c}/{name}") is not None:
        raise EnrolError(f"cluster {c} has a node named {name}: pick another VM name "
                         "(nothing was changed)")
    for other in await list_specs(kv, c):
        if other.ip == addr:
            raise EnrolError(f"VM {other.name} of cluster {c} has address {addr} already "
                             "(nothing was changed)")
    user = vm_user(name)
    if user in await kv.users():  # left by an enrolment that did not finish
        await kv.delete_user(user)
    await kv.delete_role(user)
    key_pem, cert_pem, serial = issue_client(admin.pki, user, c, ttl, not_before=not_before)
    cert_start = not_before or datetime.datetime.now(datetime.UTC)
    expires = rfc3339(cert_start + ttl)
    spec = VmSpec(name=name, cluster=c, ip=addr, labels=labels, namespace=namespace, lease=lease,
                  cert_serial=format(serial, "x"), expires=expires, created=now_rfc3339(),
                  ttl=max(10, int(ttl.total_seconds())))
    try:
        await kv.add_role(user, vm_grants(c, name))
        await kv.add_user(user)
        await kv.grant_role(user, user)
        if not await kv.create(vm_spec_key(c, name), spec.to_json()):
            raise EnrolError(f"VM {name} was enrolled in cluster {c} meanwhile (nothing was changed)")
    except BaseException:
        try:
            await kv.delete_user(user)
            await kv.delete_role(user)
        except KvError as e:
            log.error("undoing the enrolment of VM %s: %s (delete user and role %s by hand)",
                      name, e, user)
        raise
    ca = (admin.pki / "ca.crt").read_text()
    bundle = Bundle.model_validate({
        "name": name, "cluster": c, "clusterID": cluster_id, "ip": addr, "namespace": namespace,
        "labels": labels, "lease": lease, "expires": expires,
        "etcd": {"endpoints": admin.advertise, "ca": ca, "cert": cert_pem.decode(),
                 "key": key_pem.decode()},
        "remotes": {n: r.model_dump() for n, r in admin.remotes.items() if n != c}})
    log.info("VM %s enrolled in cluster %s (%s, certificate %x until %s)", name, c, addr, serial,
             expires)
    return sign_bundle(bundle, lambda data: sign(admin.pki, data))


async def list_specs(kv: KvStore, cluster: str) -> list[VmSpec]:
    items, _ = await kv.list_prefix(f"{VMS_PREFIX}/{cluster}/")
    out = []
    for item in items:
        parsed = parse_vm_key(cluster, item.key)
        if parsed is not None and parsed[1] == "spec":
            try:
                out.append(VmSpec.from_json(item.value))
            except InvalidValue as e:
                log.warning("skipping %s: %s", item.key, e)
    return out


async def list_vms(kv: KvStore, cluster: str) -> list[dict[str, Any]]:
    """Every enrolled VM: name, cluster, IP, labels, identity, state (pending, joined, lost)."""
    items, _ = await kv.list_prefix(f"{VMS_PREFIX}/{cluster}/")
    seen: dict[str, set[str]] = {}
    specs: dict[str, VmSpec] = {}
    for item in items:
        parsed = parse_vm_key(cluster, item.key)
        if parsed is None:
            continue
        vm, what = parsed
        seen.setdefault(vm, set()).add(what)
        if what == "spec":
            try:
                specs[vm] = VmSpec.from_json(item.value)
            except InvalidValue as e:
                log.warning("skipping %s: %s", item.key, e)
    rows = []
    for vm, spec in sorted(specs.items()):
        present = seen.get(vm, set())
        state = "joined" if "node" in present else "lost" if "joined" in present else "pending"
        identity = None
        ip = await kv.get(f"{IPCACHE_PREFIX}/{spec.ip}")
        if ip is not None and state == "joined":
            try:
                identity = IPIdentity.from_json(ip.value).identity
            except InvalidValue:
                identity = None
        rows.append({"name": vm, "cluster": cluster, "ip": spec.ip, "labels": spec.labels,
                     "namespace": spec.namespace, "identity": identity, "state": state,
                     "lease": spec.lease, "expires": spec.expires})
    return rows


async def delete(admin: ClusterAdmin, name: str) -> list[str]:
    """Revoke `name` and remove it from the cluster; returns what was done."""
    c, kv = admin.cluster, admin.kv
    try:
        check_vm_name(name)
    except InvalidValue as e:
        raise EnrolError(str(e)) from None
    user = vm_user(name)
    item = await kv.get(vm_spec_key(c, name))
    spec = VmSpec.from_json(item.value) if item is not None else None
    done = []
    if await kv.delete_user(user):  # first: from now on etcd refuses the VM's every request
        done.append(f"etcd user {user} deleted")
    if await kv.delete_role(user):
        done.append(f"etcd role {user} deleted")
    if spec is not None and spec.cert_serial:
        serial = int(spec.cert_serial, 16)
        revoked = revoked_serials(admin.pki)
        if serial not in revoked:
            write_crl(admin.pki, revoked | {serial})
            done.append(f"certificate {spec.cert_serial} revoked")
    node = await kv.get(vm_node_key(c, name))
    if node is not None and node.lease and await kv.revoke(node.lease):
        done.append("its lease revoked")
    if await kv.delete_prefix(vm_prefix(c, name)):
        done.append(f"its keys under {vm_prefix(c, name)} deleted")
    if not done:
        raise EnrolError(f"no VM {name} in cluster {c}")
    log.info("VM %s of cluster %s revoked: %s", name, c, "; ".join(done))
    return done

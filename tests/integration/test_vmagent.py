"""VM enrolment against a real etcd with TLS, client-certificate users and RBAC, and the
cluster's apiserver: enrol, join, liveness, revocation, and every bundle that must be refused."""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from clustermesh.apiserver import ApiServer
from clustermesh.kvstore import KvError, KvStore, PermissionDenied, Tls
from clustermesh.models import IPCACHE_PREFIX, NODES_PREFIX, IPIdentity, Node, identity_range
from clustermesh.pki import etcd_auth_commands, etcd_tls_args, etcdctl_tls, make_cluster_pki
from clustermesh.vms import VmSpec, vm_joined_key, vm_node_key, vm_spec_key, vm_user
from plexus.core.config import ConfigError
from tests.support import Etcd, eventually, free_port
from vmagent import enrol
from vmagent.bundle import Bundle, load_bundle, write_bundle
from vmagent.registration import Registration

WG_KEY = "x" * 43 + "="
WG_KEY2 = "y" * 43 + "="


@dataclass
class TlsEtcd(Etcd):
    etcdctl_args: list[str] = field(default_factory=list)

    def healthy(self) -> bool:
        r = subprocess.run(["etcdctl", "--endpoints", self.client_url, *self.etcdctl_args,
                            "endpoint", "health"], capture_output=True)
        return r.returncode == 0


@pytest.fixture
def cluster_etcd(tmp_path: Path) -> Iterator[tuple[Etcd, Path]]:
    """East's etcd as the lab runs it: TLS, client-cert users, auth on, a revocation list."""
    pki = tmp_path / "pki" / "east"
    make_cluster_pki("east", pki, ["127.0.0.1"])
    data = Path(tempfile.mkdtemp(prefix="plexus-etcd-vm-"))
    tls = etcdctl_tls(pki)
    e = TlsEtcd("east", f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                data / "data", etcdctl_args=tls)
    try:
        e.start(etcd_tls_args(pki))
        for cmd in etcd_auth_commands("east"):
            r = subprocess.run(["etcdctl", "--endpoints", e.client_url, *tls, *cmd],
                               capture_output=True, text=True)
            assert r.returncode == 0, (cmd, r.stderr)
        yield e, pki
    finally:
        e.stop()
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class Cluster:
    etcd: Etcd
    pki: Path
    admin: enrol.ClusterAdmin
    apiserver: ApiServer


@pytest.fixture
async def east(cluster_etcd: tuple[Etcd, Path]) -> AsyncIterator[Cluster]:
    etcd, pki = cluster_etcd
    kv = KvStore([etcd.endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    server = ApiServer(kv, "east", 1, gc_interval=3600)
    task = asyncio.create_task(server.run())
    try:
        await eventually(server.synced.is_set, 15, what="apiserver synced")
        yield Cluster(etcd, pki, enrol.ClusterAdmin("east", kv, pki, [etcd.endpoint]), server)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kv.close()


def vm_store(bundle: Bundle, d: Path) -> KvStore:
    """The VM's etcd client, from its bundle alone."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "cert", "key"):
        p = d / f"{name}.pem"
        p.write_text(getattr(bundle.etcd, name))
        os.chmod(p, 0o600)
    return KvStore(bundle.etcd.endpoints, Tls(d / "ca.pem", d / "cert.pem", d / "key.pem"), timeout=3)


async def published(kv: KvStore, ip: str) -> IPIdentity | None:
    item = await kv.get(f"{IPCACHE_PREFIX}/{ip}")
    return IPIdentity.from_json(item.value) if item else None


async def test_enrol_join_withdraw_return_revoke(east: Cluster, tmp_path: Path) -> None:
    admin = east.admin
    bundle = await enrol.create(admin, "db1", "172.31.3.10", {"app": "db", "env": "prod"}, lease=3)
    path = tmp_path / "db1.yaml"
    write_bundle(path, bundle)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = load_bundle(path, name="db1")
    assert (loaded.name, loaded.cluster, loaded.cluster_id, str(loaded.ip)) == \
        ("db1", "east", 1, "172.31.3.10")
    assert vm_user("db1") in await admin.kv.users()
    [row] = await enrol.list_vms(admin.kv, "east")
    assert (row["name"], row["state"], row["identity"]) == ("db1", "pending", None)

    # Enrolling the same name, or the same address, again is refused and changes nothing.
    spec_before = await admin.kv.get(vm_spec_key("east", "db1"))
    with pytest.raises(enrol.EnrolError, match="already enrolled"):
        await enrol.create(admin, "db1", "172.31.3.11", {"app": "x"})
    with pytest.raises(enrol.EnrolError, match=r"has address 172\.31\.3\.10"):
        await enrol.create(admin, "db2", "172.31.3.10", {"app": "x"})
    assert await admin.kv.get(vm_spec_key("east", "db1")) == spec_before
    assert vm_user("db2") not in await admin.kv.users()

    vm_kv = vm_store(loaded, tmp_path / "vm")
    key = [WG_KEY]
    reg = Registration(vm_kv, "east", "db1", loaded.lease, enrol_serial(loaded), lambda: key[0])
    task = asyncio.create_task(reg.run())
    try:
        ident = await eventually(lambda: published(admin.kv, "172.31.3.10"), 10,
                                 what="the VM's ipcache entry")
        lo, hi = identity_range(1)
        assert lo <= ident.identity <= hi
        node_item = await admin.kv.get(f"{NODES_PREFIX}/east/db1")
        assert node_item is not None
        node = Node.from_json(node_item.value)
        assert node.wireguard_pubkey == WG_KEY and node.internal_ip() == "172.31.3.10"
        labels = (await admin.kv.get(f"cilium/state/identities/v1/id/{ident.identity}"))
        assert labels is not None and b"k8s:app=db;" in labels.value
        assert b"k8s:io.cilium.k8s.policy.cluster=east;" in labels.value
        [row] = await enrol.list_vms(admin.kv, "east")
        assert (row["state"], row["identity"]) == ("joined", ident.identity)

        # A new WireGuard key reaches the node record.
        key[0] = WG_KEY2
        reg.changed.set()
        await eventually(lambda: _node_key(admin.kv, "db1", WG_KEY2), 10, what="new key published")

        # The VM reads the shared state, and may write nothing but its own record.
        assert await vm_kv.get(f"{IPCACHE_PREFIX}/172.31.3.10") is not None
        for k in (vm_node_key("east", "db2"), vm_spec_key("east", "db1"),
                  "plexus/registrations/v1/east/nodes/n1", f"{IPCACHE_PREFIX}/10.9.9.9",
                  f"{NODES_PREFIX}/east/db1"):
            with pytest.raises(PermissionDenied):
                await vm_kv.put(k, "{}")
            if "db1" not in k:  # the VM's spec and node record exist: unchanged, checked below
                assert await admin.kv.get(k) is None, k
        with pytest.raises(PermissionDenied):
            await vm_kv.list_prefix("plexus/registrations/")
        assert await admin.kv.get(vm_spec_key("east", "db1")) == spec_before
        assert await _node_key(admin.kv, "db1", WG_KEY2)

        # Killed: withdrawn once its lease runs out; lost in the list; back on restart.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventually(lambda: _gone(admin.kv, "172.31.3.10"), loaded.lease + 3,
                         what="the silent VM withdrawn within its lease")
        assert await admin.kv.get(f"{NODES_PREFIX}/east/db1") is None
        [row] = await enrol.list_vms(admin.kv, "east")
        assert row["state"] == "lost"
        task = asyncio.create_task(reg.run())
        await eventually(lambda: published(admin.kv, "172.31.3.10"), 10, what="the VM back")

        # Revoked: its user and certificate go, it cannot write, it is gone from the cluster.
        done = await enrol.delete(admin, "db1")
        assert any("revoked" in d for d in done)
        assert vm_user("db1") not in await admin.kv.users()
        await eventually(lambda: _gone(admin.kv, "172.31.3.10"), 10, what="revoked VM withdrawn")
        with pytest.raises(KvError):
            await vm_kv.put(vm_node_key("east", "db1"), "{}")
        fresh = vm_store(loaded, tmp_path / "vm2")
        with pytest.raises(KvError):  # a new connection: the handshake itself is refused
            await fresh.get(f"{IPCACHE_PREFIX}/172.31.3.10")
        await fresh.close()
        await eventually(lambda: reg.status.state == "refused", 10, what="the agent sees it")
        assert await admin.kv.get(vm_node_key("east", "db1")) is None
        assert await admin.kv.get(vm_joined_key("east", "db1")) is None
        assert await enrol.list_vms(admin.kv, "east") == []
        with pytest.raises(enrol.EnrolError, match="no VM db1"):
            await enrol.delete(admin, "db1")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await vm_kv.close()


def enrol_serial(bundle: Bundle) -> str:
    from vmagent.bundle import cert_serial
    return cert_serial(bundle)


async def _node_key(kv: KvStore, name: str, key: str) -> bool:
    item = await kv.get(f"{NODES_PREFIX}/east/{name}")
    return item is not None and Node.from_json(item.value).wireguard_pubkey == key


async def _gone(kv: KvStore, ip: str) -> bool:
    return await kv.get(f"{IPCACHE_PREFIX}/{ip}") is None


async def test_bad_bundles_are_refused(east: Cluster, tmp_path: Path) -> None:
    admin = east.admin
    bundle = await enrol.create(admin, "web1", "172.31.3.20", {"app": "web"}, lease=3)
    good = tmp_path / "web1.yaml"
    write_bundle(good, bundle)

    # Tampered: labels changed after signing.
    data = yaml.safe_load(good.read_text())
    data["labels"] = {"app": "db"}
    tampered = tmp_path / "tampered.yaml"
    tampered.write_text(yaml.safe_dump(data))
    os.chmod(tampered, 0o600)
    with pytest.raises(ConfigError, match=r"tampered.yaml: signature: does not match"):
        load_bundle(tampered)

    # For another VM.
    with pytest.raises(ConfigError, match=r"web1.yaml: name: this bundle is for VM 'web1', not 'db1'"):
        load_bundle(good, name="db1")

    # Readable by others.
    os.chmod(good, 0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        load_bundle(good)
    os.chmod(good, 0o600)

    # Unknown field, named with the file.
    data = yaml.safe_load(good.read_text())
    data["extra"] = 1
    bad = tmp_path / "extra.yaml"
    bad.write_text(yaml.safe_dump(data))
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match=r"extra\.yaml: extra: unknown field"):
        load_bundle(bad)

    # Forged: another CA made and signed it; it verifies against itself, etcd refuses it.
    mallory = tmp_path / "mallory"
    make_cluster_pki("east", mallory, ["127.0.0.1"])
    forged = await _forged(bundle, mallory)
    forged_path = tmp_path / "forged.yaml"
    write_bundle(forged_path, forged)
    load_bundle(forged_path)  # self-consistent
    fkv = vm_store(forged, tmp_path / "forged")
    freg = Registration(fkv, "east", "web1", 3, "", lambda: WG_KEY)
    ftask = asyncio.create_task(freg.run())
    try:
        await eventually(lambda: freg.status.last_error, 15, what="the forged join fails")
        assert freg.status.state in ("retrying", "refused")
        assert await admin.kv.get(vm_node_key("east", "web1")) is None
    finally:
        ftask.cancel()
        await asyncio.gather(ftask, return_exceptions=True)
        await fkv.close()

    # Expired: refused by the bundle check and by etcd's handshake.
    old = await enrol.create(admin, "old1", "172.31.3.21", {"app": "old"},
                             ttl=datetime.timedelta(hours=1),
                             not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2))
    old_path = tmp_path / "old1.yaml"
    write_bundle(old_path, old)
    with pytest.raises(ConfigError, match=r"old1.yaml: etcd.cert: expired at"):
        load_bundle(old_path)
    okv = vm_store(old, tmp_path / "old")
    with pytest.raises(KvError):
        await okv.get(vm_spec_key("east", "old1"))
    await okv.close()

    # Revoked and enrolled again: the old bundle's certificate is refused by etcd, and a
    # certificate that is not the one the spec names is refused by the agent.
    await enrol.delete(admin, "web1")
    renewed = await enrol.create(admin, "web1", "172.31.3.20", {"app": "web"}, lease=3)
    rkv = vm_store(bundle, tmp_path / "replaced")
    with pytest.raises(KvError):
        await rkv.put(vm_node_key("east", "web1"), "{}")
    await rkv.close()
    nkv = vm_store(renewed, tmp_path / "renewed")
    rreg = Registration(nkv, "east", "web1", 3, "abc", lambda: WG_KEY)
    rtask = asyncio.create_task(rreg.run())
    try:
        await eventually(lambda: rreg.status.state == "refused", 15, what="the old bundle refused")
        assert "enrolled again with another certificate" in rreg.status.last_error
        assert await admin.kv.get(vm_node_key("east", "web1")) is None
    finally:
        rtask.cancel()
        await asyncio.gather(rtask, return_exceptions=True)
        await nkv.close()
    assert await published(admin.kv, "172.31.3.20") is None


async def _forged(bundle: Bundle, pki: Path) -> Bundle:
    from clustermesh.pki import issue_client, sign
    from vmagent.bundle import sign_bundle
    key, cert, _ = issue_client(pki, vm_user(bundle.name), "east", datetime.timedelta(hours=1))
    etcd = bundle.etcd.model_copy(update={"ca": (pki / "ca.crt").read_text(), "cert": cert.decode(),
                                          "key": key.decode()})
    return sign_bundle(bundle.model_copy(update={"etcd": etcd, "labels": {"app": "db"}}),
                       lambda data: sign(pki, data))


async def test_the_host_renews_its_certificate_before_it_expires(east: Cluster,
                                                                 tmp_path: Path) -> None:
    from clustermesh.vm_signer import VmSigner
    from vmagent.renewal import Renewal
    from vmagent.renewal import cert_serial as file_serial

    admin = east.admin
    signer = VmSigner(admin.kv, "east", east.pki)
    signer_task = asyncio.create_task(signer.run())
    ttl = datetime.timedelta(seconds=16)
    bundle = await enrol.create(admin, "r1", "172.31.3.30", {"app": "r"}, lease=3, ttl=ttl)
    first_expiry = datetime.datetime.now(datetime.UTC) + ttl
    d = tmp_path / "r1"
    vm_kv = vm_store(bundle, d)
    serial0 = file_serial(d / "cert.pem")
    reg = Registration(vm_kv, "east", "r1", 3, serial0, lambda: WG_KEY)
    renewal = Renewal(vm_kv, "east", "r1", d / "ca.pem", d / "cert.pem", d / "key.pem",
                      lambda s: setattr(reg, "cert_serial", s), poll=0.2)
    tasks = [asyncio.create_task(reg.run())]
    try:
        await eventually(lambda: published(admin.kv, "172.31.3.30"), 10, what="joined")
        # Asked too early (first half of the lifetime): refused, nothing issued.
        await vm_kv.put("plexus/vms/v1/east/r1/host/renew", '{"publicKey": "x"}')
        await eventually(lambda: "second half" in signer.refused.get("r1", ""), 10,
                         what="early request refused")
        assert await admin.kv.get("plexus/vms/v1/east/r1/issued") is None
        # Another VM's key is not writable, so no VM asks for another's certificate.
        with pytest.raises(PermissionDenied):
            await vm_kv.put("plexus/vms/v1/east/db9/host/renew", '{"publicKey": "x"}')

        tasks.append(asyncio.create_task(renewal.run()))
        await eventually(lambda: renewal.status.renewals >= 1, 20, what="renewed at half-life")
        serial1 = file_serial(d / "cert.pem")
        assert serial1 != serial0 and reg.cert_serial == serial1
        item = await admin.kv.get(vm_spec_key("east", "r1"))
        assert item is not None and VmSpec.from_json(item.value).cert_serial == serial1
        assert os.stat(d / "key.pem").st_mode & 0o777 == 0o600

        # Past the first certificate's expiry the host still joins and writes: a fresh
        # connection from its files, and its registration with them.
        await eventually(lambda: datetime.datetime.now(datetime.UTC) > first_expiry
                         + datetime.timedelta(seconds=1), 30, interval=0.2,
                         what="the first certificate expired")
        fresh = KvStore(bundle.etcd.endpoints, Tls(d / "ca.pem", d / "cert.pem", d / "key.pem"))
        assert await fresh.get(vm_spec_key("east", "r1")) is not None
        await fresh.put("plexus/vms/v1/east/r1/host/joined", "again")
        await fresh.close()
        assert await published(admin.kv, "172.31.3.30") is not None
        assert reg.status.state == "joined"
    finally:
        for t in [*tasks, signer_task]:
            t.cancel()
        await asyncio.gather(*tasks, signer_task, return_exceptions=True)
        await vm_kv.close()



async def test_a_lease_that_outlives_an_etcd_outage_is_joined_again(east: Cluster,
                                                                    tmp_path: Path) -> None:
    bundle = await enrol.create(east.admin, "o1", "172.31.3.40", {"app": "o"}, lease=10)
    vm_kv = vm_store(bundle, tmp_path / "o1")
    reg = Registration(vm_kv, "east", "o1", 10, enrol_serial(bundle), lambda: WG_KEY)
    task = asyncio.create_task(reg.run())
    try:
        await eventually(lambda: reg.status.state == "joined", 10, what="joined")
        lease = reg.status.lease_id
        east.etcd.stop()
        await eventually(lambda: reg.status.state == "retrying", 20, what="the outage seen")
        east.etcd.start(etcd_tls_args(east.pki))
        # etcd restores the lease with its full TTL: the same lease, the state joined again
        await eventually(lambda: reg.status.state == "joined", 30, what="joined again")
        assert reg.status.lease_id == lease and reg.status.last_error == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await vm_kv.close()

"""etcd with TLS and client-certificate auth, per-role users, the read-only remote endpoint,
and a 3-member cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from aetcd.rpc import rpc_pb2_grpc

from clustermesh.apiserver import ApiServer
from clustermesh.etcd_proxy import ReadOnlyEtcdProxy
from clustermesh.kvstore import KvError, KvStore, PermissionDenied, Tls, Unavailable
from clustermesh.models import IPCACHE_PREFIX, EndpointRegistration, endpoint_registration_key
from clustermesh.pki import (
    REMOTE_PORT,
    connect,
    etcd_auth_commands,
    etcd_tls_args,
    etcdctl_tls,
    make_cluster_pki,
)
from tests.support import Etcd, etcd_cluster, eventually, free_port, wait_until


@dataclass
class TlsEtcd(Etcd):
    """An etcd whose health check presents the client certificate it requires."""

    etcdctl_args: list[str] = field(default_factory=list)

    def healthy(self) -> bool:
        r = subprocess.run(["etcdctl", "--endpoints", self.client_url, *self.etcdctl_args, "endpoint",
                            "health"], capture_output=True)
        return r.returncode == 0


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[tuple[Etcd, Path]]:
    """A TLS etcd with client-cert auth, its users and roles set up as for a cluster."""
    pki = tmp_path / "pki" / "west"
    make_cluster_pki("west", pki, ["127.0.0.1"])
    data = Path(tempfile.mkdtemp(prefix="plexus-etcd-tls-"))
    port = free_port()
    tls = etcdctl_tls(pki)
    e = TlsEtcd("west", f"https://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}", data / "data",
                etcdctl_args=tls)
    try:
        e.start(etcd_tls_args(pki))
        for cmd in etcd_auth_commands("west"):
            r = subprocess.run(["etcdctl", "--endpoints", e.client_url, *tls, *cmd],
                               capture_output=True, text=True)
            assert r.returncode == 0, (cmd, r.stderr)
        yield e, pki
    finally:
        e.stop()
        shutil.rmtree(data, ignore_errors=True)


@contextlib.asynccontextmanager
async def remote_endpoint(etcd: Etcd, pki: Path) -> AsyncIterator[str]:
    """The read-only endpoint in front of `etcd`, on a free loopback port."""
    proxy = ReadOnlyEtcdProxy(f"127.0.0.1:{free_port()}", [etcd.endpoint], pki)
    await proxy.start()
    try:
        yield f"https://127.0.0.1:{proxy.port}"
    finally:
        await proxy.stop()


def test_private_keys_are_0600(tmp_path: Path) -> None:
    files = make_cluster_pki("east", tmp_path / "east", ["172.31.1.250"])
    assert files
    for key in (tmp_path / "east").glob("*.key"):
        assert os.stat(key).st_mode & 0o777 == 0o600, key


async def test_tls_roles_and_mismatch(tmp_path: Path, secure_etcd: tuple[Etcd, Path]) -> None:
    etcd, pki = secure_etcd
    admin = KvStore([etcd.endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    server = ApiServer(admin, "west", 2)
    task = asyncio.create_task(server.run())
    try:
        await eventually(server.synced.is_set, 15, what="apiserver synced over TLS")
        await admin.put(endpoint_registration_key("west", "n1", "c1"), EndpointRegistration(
            "10.2.1.5", "default", "p", {"app": "db"}, "n1", "172.31.2.11").to_json())
        await eventually(lambda: admin.get(f"{IPCACHE_PREFIX}/10.2.1.5"), 10)

        # What `connect` hands to another cluster: read what ClusterMesh shares, nothing more.
        make_cluster_pki("east", tmp_path / "pki" / "east", ["127.0.0.2"])
        written = connect("east", "west", tmp_path / "pki", {"east": [tmp_path / "east-mesh"],
                                                             "west": [tmp_path / "west-mesh"]})
        assert written == [tmp_path / "east-mesh" / "west", tmp_path / "west-mesh" / "east"]
        conf = (tmp_path / "east-mesh" / "west").read_text()
        assert "https://127.0.0.1" in conf
        assert f"https://127.0.0.1:{REMOTE_PORT}" in conf
        d = tmp_path / "east-mesh"
        async with remote_endpoint(etcd, pki) as endpoint:
            remote = KvStore([endpoint], Tls(d / "west.ca.crt", d / "west.client.crt",
                                             d / "west.client.key"))
            items, _ = await remote.list_prefix(f"{IPCACHE_PREFIX}/")
            assert [i.key for i in items] == [f"{IPCACHE_PREFIX}/10.2.1.5"]
            assert await remote.get("cilium/cluster-config/west") is not None
            with pytest.raises(PermissionDenied):
                await remote.put(f"{IPCACHE_PREFIX}/10.9.9.9", "{}")
            with pytest.raises(PermissionDenied):
                await remote.list_prefix("plexus/registrations/v1/")
            await remote.close()

        # A certificate from another CA, or the wrong CA, is refused.
        other = tmp_path / "pki" / "mallory"
        make_cluster_pki("mallory", other, ["127.0.0.1"])
        for tls in (Tls(pki / "ca.crt", other / "admin.crt", other / "admin.key"),
                    Tls(other / "ca.crt", pki / "admin.crt", pki / "admin.key")):
            bad = KvStore([etcd.endpoint], tls, timeout=2)
            with pytest.raises(KvError):
                await bad.status()
            await bad.close()
        with pytest.raises(KvError, match="trusted CA"):
            KvStore([etcd.endpoint])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await admin.close()


async def test_the_remote_certificate_reads_and_watches_and_does_nothing_else(
        secure_etcd: tuple[Etcd, Path]) -> None:
    etcd, pki = secure_etcd
    admin = KvStore([etcd.endpoint], Tls(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))
    remote_tls = Tls(pki / "ca.crt", pki / "remote.crt", pki / "remote.key")
    try:
        lease = await admin.grant(60)
        await admin.put("plexus/registrations/v1/west/n1/c1", "{}", lease=lease)
        await admin.put("plexus/manifests/v1/west/Service/shop/web", "{}")
        await admin.put("plexus/manifests/v2/west/Service/shop/web", "{}")
        await admin.put(f"{IPCACHE_PREFIX}/10.2.1.5", "{}")
        revision = await admin.status()

        # etcd itself does not trust the remote CA: the certificate cannot reach it directly.
        direct = KvStore([etcd.endpoint], remote_tls, timeout=2)
        with pytest.raises(KvError):
            await direct.status()
        await direct.close()

        async with remote_endpoint(etcd, pki) as endpoint:
            remote = KvStore([endpoint], remote_tls)
            assert await remote.status() >= revision
            # The manifests grant is the versioned prefix, nothing wider.
            assert await remote.get("plexus/manifests/v1/west/Service/shop/web") is not None
            with pytest.raises(PermissionDenied):
                await remote.get("plexus/manifests/v2/west/Service/shop/web")
            with pytest.raises(PermissionDenied):
                await remote.list_prefix("plexus/manifests/")

            # Writes, compaction, leases, alarms, auth and membership are refused.
            with pytest.raises(PermissionDenied):
                await remote.compact(revision)
            with pytest.raises(PermissionDenied):
                await remote.grant(60)
            with pytest.raises(PermissionDenied):
                await remote.keepalive_once(lease)
            with pytest.raises(PermissionDenied):
                await remote.delete(f"{IPCACHE_PREFIX}/10.2.1.5")
            with pytest.raises(PermissionDenied):
                await remote.create(f"{IPCACHE_PREFIX}/10.9.9.9", "{}")
            await remote.connect()
            channel = remote._channel
            assert channel is not None
            lease_stub = rpc_pb2_grpc.LeaseStub(channel)
            maintenance = rpc_pb2_grpc.MaintenanceStub(channel)
            auth = rpc_pb2_grpc.AuthStub(channel)
            cluster = rpc_pb2_grpc.ClusterStub(channel)
            refused = [
                lease_stub.LeaseTimeToLive(rpc.LeaseTimeToLiveRequest(ID=lease, keys=True)),
                lease_stub.LeaseLeases(rpc.LeaseLeasesRequest()),
                lease_stub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease)),
                maintenance.Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.ACTIVATE,
                                                   alarm=rpc.NOSPACE)),
                maintenance.Defragment(rpc.DefragmentRequest()),
                auth.AuthDisable(rpc.AuthDisableRequest()),
                auth.RoleGet(rpc.AuthRoleGetRequest(role="remote")),
                cluster.MemberList(rpc.MemberListRequest()),
            ]
            for call in refused:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value

            # Watches are forwarded: a change made by the cluster reaches the remote.
            async def first_event() -> str:
                async for events, _ in remote.watch(f"{IPCACHE_PREFIX}/", revision + 1):
                    if events:
                        return events[0].key
                return ""

            watching = asyncio.create_task(first_event())
            await admin.put(f"{IPCACHE_PREFIX}/10.2.1.6", "{}")
            assert await asyncio.wait_for(watching, 10) == f"{IPCACHE_PREFIX}/10.2.1.6"
            await remote.close()

        # Nothing the remote tried took effect: no alarm, the history and the lease are intact.
        alarms = await admin._call("_maintenance", "Alarm", rpc.AlarmRequest(
            action=rpc.AlarmRequest.GET))
        assert list(alarms.alarms) == []
        old = await admin._call("_kv", "Range", rpc.RangeRequest(
            key=f"{IPCACHE_PREFIX}/10.2.1.5".encode(), revision=revision))
        assert len(old.kvs) == 1
        assert await admin.keepalive_once(lease) > 0
        await admin.put(f"{IPCACHE_PREFIX}/10.2.1.7", "{}")
    finally:
        await admin.close()


async def test_three_member_cluster_loses_a_member_and_nothing(tmp_path: Path) -> None:
    with etcd_cluster(3) as members:
        kv = KvStore([m.endpoint for m in members], timeout=3)
        server = ApiServer(kv, "east", 1)
        task = asyncio.create_task(server.run())
        try:
            await eventually(server.synced.is_set, 15)
            for i in range(40):
                if i == 20:
                    members[0].stop()  # the member the client is most likely talking to
                for attempt in range(50):
                    try:
                        await kv.put(endpoint_registration_key("east", "n1", f"c{i}"),
                                     EndpointRegistration(f"10.1.1.{i + 10}", "default", f"p{i}",
                                                          {"app": "x"}, "n1", "172.31.1.11").to_json())
                        break
                    except Unavailable:
                        await asyncio.sleep(0.1 * (attempt + 1))

            async def published() -> bool:
                items, _ = await kv.list_prefix(f"{IPCACHE_PREFIX}/")
                return len(items) == 40

            await eventually(published, 30, what=lambda: f"all 40 endpoints published; server "
                             f"{_leaves(task.exception()) if task.done() else 'running'} {server.status()}")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kv.close()
        survivor = members[1]
        wait_until(survivor.healthy, 10)


def _leaves(e: BaseException | None) -> list[str]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in _leaves(sub)]
    return [repr(e)]


def test_remote_certificates_come_from_their_own_ca(tmp_path: Path) -> None:
    from cryptography import x509

    pki = tmp_path / "east"
    make_cluster_pki("east", pki, ["127.0.0.1"])

    def issuer(name: str) -> x509.Name:
        return x509.load_pem_x509_certificate((pki / f"{name}.crt").read_bytes()).issuer

    def subject(name: str) -> x509.Name:
        return x509.load_pem_x509_certificate((pki / f"{name}.crt").read_bytes()).subject

    assert issuer("remote") == subject("remote-ca") != subject("ca")
    assert issuer("proxy") == issuer("admin") == subject("ca")
    assert (pki / "endpoints").read_text() == f"https://127.0.0.1:{REMOTE_PORT}\n"
    # A remote certificate made by the cluster CA (which etcd trusts) is replaced.
    (pki / "remote.crt").write_bytes((pki / "proxy.crt").read_bytes())
    make_cluster_pki("east", pki, ["127.0.0.1"])
    assert issuer("remote") == subject("remote-ca")

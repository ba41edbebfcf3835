"""The kvstore adapter: etcd v3 over gRPC, with TLS and failover across endpoints.

The only module that talks to etcd. It speaks etcd's protocol directly through the
protobuf stubs that aetcd ships (aetcd's own client has no TLS), so that watches,
compaction and errors are handled here, explicitly.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from aetcd import rpc
from aetcd.rpc import auth_pb2, rpc_pb2_grpc

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # etcd answers pings closer than --grpc-keepalive-min-time (5 s by default), or pings with
    # no call open, with GOAWAY "too_many_pings", which drops every watch of the connection: ping
    # at twice that, and only while a call (a watch) is open. A dead peer is noticed in ~15 s.
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
PAGE = 5000
# etcd refuses calls, and cancels watches, on a member that has lost its leader ("no leader",
# UNAVAILABLE) instead of serving them stale or leaving a watch silent: the client moves on.
_REQUIRE_LEADER = (("hasleader", "true"),)


class KvError(Exception):
    """Any kvstore failure."""


class Unavailable(KvError):
    """No endpoint answered (down, unreachable, TLS refused)."""


class PermissionDenied(KvError):
    """The user (client certificate CN) may not do this."""


class Compacted(KvError):
    """A watch asked for a revision etcd no longer keeps; relist and watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted at {revision}")
        self.revision = revision


@dataclass(frozen=True)
class Tls:
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Grant:
    """One permission of a role: read, write or readwrite on a key or a prefix."""

    perm: Literal["read", "write", "readwrite"]
    key: str
    prefix: bool = False


_PERMS = {"read": auth_pb2.Permission.READ, "write": auth_pb2.Permission.WRITE,
          "readwrite": auth_pb2.Permission.READWRITE}


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _target(endpoints: Sequence[str]) -> tuple[str, bool]:
    if not endpoints:
        raise KvError("no etcd endpoints configured")
    hosts, schemes = [], set()
    for ep in endpoints:
        u = urllib.parse.urlsplit(ep if "://" in ep else f"http://{ep}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise KvError(f"etcd endpoint {ep!r} is not http(s)://host:port")
        schemes.add(u.scheme)
        hosts.append(f"{u.hostname}:{u.port or 2379}")
    if len(schemes) > 1:
        raise KvError("etcd endpoints mix http and https")
    if all(h.split(":")[0].replace(".", "").isdigit() for h in hosts):
        return "ipv4:" + ",".join(hosts), schemes == {"https"}
    if len(hosts) > 1:
        # name resolution picks one; several names need a resolver etcd does not ship
        return f"dns:///{hosts[0]}", schemes == {"https"}
    return hosts[0], schemes == {"https"}


def tls_channel_options(target: str) -> list[tuple[str, str | int]]:
    """Channel options for a TLS channel to `target` (as `_target` makes it)."""
    options: list[tuple[str, str | int]] = list(_GRPC_OPTIONS)
    if target.startswith("ipv4:") and "," in target:
        # Several addresses share one channel, whose authority is none of them: every
        # member is checked against the first one's address, so the members' server
        # certificate must name every member (as one certificate per cluster does).
        first = target.removeprefix("ipv4:").split(",")[0].rsplit(":", 1)[0]
        options.append(("grpc.ssl_target_name_override", first))
    return options


def _translate(e: grpc.aio.AioRpcError) -> KvError:
    code = e.code()
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(e.details() or "permission denied")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return Unavailable(e.details() or code.name)
    return KvError(f"{code.name}: {e.details()}")


class KvStore:
    """An etcd client: get/list_prefix/put/delete, transactions, leases, watches."""

    def __init__(self, endpoints: Sequence[str], tls: Tls | None = None,
                 timeout: float = 5.0) -> None:
        self.endpoints = list(endpoints)
        self.tls = tls
        self.timeout = timeout
        self._target, self._secure = _target(self.endpoints)
        if self._secure and tls is None:
            raise KvError("https endpoints need a trusted CA (trusted-ca-file)")
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch: Any = None
        self._lease: Any = None
        self._maintenance: Any = None
        self._auth: Any = None
        self._stamp: tuple[int, ...] = ()  # the TLS files as the channel read them
        self._closes = 0  # a watch resumes only on the store it started on, never after close()

    def _tls_stamp(self) -> tuple[int, ...]:
        if self.tls is None:
            return ()
        out = []
        for f in (self.tls.ca_file, self.tls.cert_file, self.tls.key_file):
            try:
                out.append(f.stat().st_mtime_ns if f is not None else 0)
            except OSError:
                out.append(-1)
        return tuple(out)

    async def connect(self) -> None:
        if self._channel is not None:
            # Certificates renewed in place (an enrolled VM's) take effect on the next call.
            if not self._secure or self._tls_stamp() == self._stamp:
                return
            await self.close()
        if self._secure:
            self._stamp = self._tls_stamp()
            assert self.tls is not None
            try:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=self.tls.ca_file.read_bytes(),
                    private_key=self.tls.key_file.read_bytes() if self.tls.key_file else None,
                    certificate_chain=self.tls.cert_file.read_bytes() if self.tls.cert_file else None)
            except OSError as e:
                raise KvError(f"cannot read TLS material: {e}") from None
            self._channel = grpc.aio.secure_channel(self._target, creds,
                                                    options=tls_channel_options(self._target))
        else:
            self._channel = grpc.aio.insecure_channel(self._target, options=_GRPC_OPTIONS)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)
        self._lease = rpc_pb2_grpc.LeaseStub(self._channel)
        self._maintenance = rpc_pb2_grpc.MaintenanceStub(self._channel)
        self._auth = rpc_pb2_grpc.AuthStub(self._channel)

    async def close(self) -> None:
        self._closes += 1
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> KvStore:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _call(self, stub: str, method: str, request: Any,
                    deadline: float | None = None) -> Any:
        await self.connect()
        call = getattr(getattr(self, stub), method)
        # With several members, a call that found its member gone, or the leader changing under
        # it, goes again (to the member the channel picks next, as a watch resumes there) until
        # its time is up: losing one member of three goes unnoticed, however long the election.
        retry = len(self.endpoints) > 1
        end = time.monotonic() + (deadline or self.timeout)
        while True:
            try:
                return await call(request, timeout=max(end - time.monotonic(), 0.1),
                                  wait_for_ready=False, metadata=_REQUIRE_LEADER)
            except grpc.aio.AioRpcError as e:
                error = _translate(e)
                if not (retry and isinstance(error, Unavailable)) or time.monotonic() + 0.2 >= end:
                    raise error from None
            await asyncio.sleep(0.2)

    # ---- reads ----------------------------------------------------------------------
    async def status(self) -> int:
        """The store's current revision; raises Unavailable when no endpoint answers."""
        resp = await self._call("_maintenance", "Status", rpc.StatusRequest())
        return int(resp.header.revision)

    async def get(self, key: str) -> KV | None:
        resp = await self._call("_kv", "Range", rpc.RangeRequest(key=key.encode()))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def list_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix` at one revision, fetched in pages."""
        start = prefix.encode()
        end = prefix_end(start)
        out: list[KV] = []
        revision = 0
        limit = PAGE
        while True:
            req = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
            try:
                resp = await self._call("_kv", "Range", req, deadline=max(self.timeout, 30))
            except KvError as e:
                # Large values make a page larger than a message may be: ask for fewer.
                if limit > 1 and "RESOURCE_EXHAUSTED" in str(e):
                    limit = max(1, limit // 8)
                    continue
                raise
            if revision == 0:
                revision = int(resp.header.revision)
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            start = resp.kvs[-1].key + b"\0"

    # ---- writes ---------------------------------------------------------------------
    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        resp = await self._call("_kv", "Put", rpc.PutRequest(
            key=key.encode(), value=_bytes(value), lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        resp = await self._call("_kv", "DeleteRange", rpc.DeleteRangeRequest(key=key.encode()))
        return bool(resp.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        p = prefix.encode()
        resp = await self._call("_kv", "DeleteRange",
                                rpc.DeleteRangeRequest(key=p, range_end=prefix_end(p)))
        return int(resp.deleted)

    async def create(self, key: str, value: bytes | str, lease: int = 0) -> bool:
        """Put only if the key does not exist; True when this call created it."""
        cmp = rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL,
                          target=rpc.Compare.CREATE, create_revision=0)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=_bytes(value),
                                                       lease=lease))
        resp = await self._call("_kv", "Txn", rpc.TxnRequest(compare=[cmp], success=[put]))
        return bool(resp.succeeded)

    async def create_many(self, items: Sequence[tuple[str, bytes | str]]) -> bool:
        """Create every key, or none if any exists already (one transaction)."""
        cmps = [rpc.Compare(key=k.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                            create_revision=0) for k, _ in items]
        puts = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=_bytes(v)))
                for k, v in items]
        resp = await self._call("_kv", "Txn", rpc.TxnRequest(compare=cmps, success=puts))
        return bool(resp.succeeded)

    async def put_if_value(self, key: str, expected: bytes, value: bytes | str) -> bool:
        cmp = rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE,
                          value=expected)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=_bytes(value)))
        resp = await self._call("_kv", "Txn", rpc.TxnRequest(compare=[cmp], success=[put]))
        return bool(resp.succeeded)

    async def delete_if_mod_revision(self, key: str, mod_revision: int) -> bool:
        """Delete only if nobody changed the key since `mod_revision`."""
        cmp = rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                          mod_revision=mod_revision)
        op = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
        resp = await self._call("_kv", "Txn", rpc.TxnRequest(compare=[cmp], success=[op]))
        return bool(resp.succeeded)

    async def put_many(self, items: Sequence[tuple[str, bytes | str]]) -> None:
        """Write many keys in transactions of up to 128 puts (etcd's default limit)."""
        for i in range(0, len(items), 128):
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=_bytes(v)))
                   for k, v in items[i:i + 128]]
            await self._call("_kv", "Txn", rpc.TxnRequest(success=ops), deadline=30)

    async def write_many(self, puts: Sequence[tuple[str, bytes | str]], deletes: Sequence[str]) -> None:
        """Deletes and puts of distinct keys in transactions of up to 128 operations (etcd
        refuses a key twice in one): one round trip where one per key would queue."""
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k.encode()))
               for k in deletes]
        ops += [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=_bytes(v)))
                for k, v in puts]
        for i in range(0, len(ops), 128):
            await self._call("_kv", "Txn", rpc.TxnRequest(success=ops[i:i + 128]), deadline=30)

    async def compact(self, revision: int) -> None:
        """Forget every revision before `revision`; watches from before it get Compacted."""
        await self._call("_kv", "Compact", rpc.CompactionRequest(revision=revision, physical=True),
                         deadline=max(self.timeout, 30))

    # ---- leases ---------------------------------------------------------------------
    async def grant(self, ttl: int) -> int:
        resp = await self._call("_lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl))
        return int(resp.ID)

    async def keepalive_once(self, lease: int) -> int:
        """Refresh a lease; returns the remaining TTL (0 when the lease is gone)."""
        await self.connect()

        async def one() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=lease)

        try:
            call = self._lease.LeaseKeepAlive(one(), timeout=self.timeout, metadata=_REQUIRE_LEADER)
            async for resp in call:
                return int(resp.TTL)
        except grpc.aio.AioRpcError as e:
            raise _translate(e) from None
        return 0

    async def revoke(self, lease: int) -> bool:
        """End a lease and delete its keys; False when it was already gone."""
        try:
            await self._call("_lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))
        except KvError as e:
            if "lease not found" in str(e):
                return False
            raise
        return True

    # ---- users and roles (etcd RBAC; the client-certificate CN is the user) ---------
    async def add_user(self, name: str) -> None:
        """A user without password: it authenticates by client certificate only."""
        await self._call("_auth", "UserAdd", rpc.AuthUserAddRequest(
            name=name, options=rpc.UserAddOptions(no_password=True)))

    async def add_role(self, name: str, grants: Sequence[Grant]) -> None:
        """A role with `grants`, given to the user of the same name."""
        await self._call("_auth", "RoleAdd", rpc.AuthRoleAddRequest(name=name))
        for g in grants:
            key = g.key.encode()
            perm = auth_pb2.Permission(permType=_PERMS[g.perm], key=key,
                                       range_end=prefix_end(key) if g.prefix else b"")
            await self._call("_auth", "RoleGrantPermission",
                             rpc.AuthRoleGrantPermissionRequest(name=name, perm=perm))

    async def grant_role(self, user: str, role: str) -> None:
        await self._call("_auth", "UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))

    async def delete_user(self, name: str) -> bool:
        """Remove a user (and so every request its certificate makes); False if absent."""
        return await self._delete_auth("UserDelete", rpc.AuthUserDeleteRequest(name=name))

    async def delete_role(self, name: str) -> bool:
        return await self._delete_auth("RoleDelete", rpc.AuthRoleDeleteRequest(role=name))

    async def users(self) -> list[str]:
        resp = await self._call("_auth", "UserList", rpc.AuthUserListRequest())
        return list(resp.users)

    async def _delete_auth(self, method: str, request: Any) -> bool:
        try:
            await self._call("_auth", method, request)
        except KvError as e:
            if "not found" in str(e):
                return False
            raise
        return True

    # ---- watch ----------------------------------------------------------------------
    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[list[Event], int]]:
        """Yield (events, revision) for keys under `prefix` from `start_revision` on.

        With several endpoints, a broken stream is resumed on another member from the
        revision after the last one delivered (revisions are the cluster's, not a member's),
        so losing one member goes unnoticed. Raises Unavailable when no member takes the
        watch again, and Compacted when the revision is gone; the caller relists. Progress
        notifications arrive as empty event lists.
        """
        next_revision = start_revision
        closes = self._closes
        failed = 0  # resumes in a row that did not get a watch going
        while True:
            try:
                async for events, revision in self._watch_stream(prefix, next_revision):
                    failed = 0
                    if events is None:
                        continue  # created
                    next_revision = (events[-1].mod_revision if events else revision) + 1
                    yield events, revision
                raise Unavailable("watch stream ended")
            except Unavailable:
                failed += 1
                if len(self.endpoints) < 2 or failed > len(self.endpoints) or closes != self._closes:
                    raise
            await asyncio.sleep(0.2)  # the channel moves to the next member that answers

    async def _watch_stream(self, prefix: str, start_revision: int
                            ) -> AsyncIterator[tuple[list[Event] | None, int]]:
        """One Watch call: None once the watch is created, then what `watch` yields."""
        await self.connect()
        p = prefix.encode()
        done = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=p, range_end=prefix_end(p), start_revision=start_revision,
                progress_notify=True, fragment=True))  # large batches come in parts
            await done.wait()

        call = self._watch.Watch(requests(), metadata=_REQUIRE_LEADER)
        parts: list[Event] = []  # of a response etcd sent in fragments
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    reason = resp.cancel_reason or "watch canceled by the server"
                    if "permission denied" in reason:
                        raise PermissionDenied(reason)
                    raise KvError(reason)
                if resp.created and not resp.events:
                    yield None, int(resp.header.revision)
                    continue
                events = [Event("delete" if ev.type == 1 else "put", ev.kv.key.decode(errors="replace"),
                                ev.kv.value, int(ev.kv.mod_revision)) for ev in resp.events]
                if resp.fragment:
                    parts.extend(events)
                    continue
                events, parts = parts + events, []
                yield events, int(resp.header.revision)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INTERNAL:  # how a stream the member cut (no leader) ends
                raise Unavailable(e.details() or "watch stream cut") from None
            raise _translate(e) from None
        finally:
            done.set()
            call.cancel()


def kv_failures(eg: BaseExceptionGroup[Any]) -> list[KvError] | None:
    """The kvstore errors inside a task group's failure, or None if anything else is there."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [eg]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        else:
            leaves.append(e)
    if all(isinstance(e, KvError) for e in leaves):
        return [e for e in leaves if isinstance(e, KvError)]
    return None


def _bytes(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def _kv(kv: Any) -> KV:
    return KV(kv.key.decode(errors="replace"), kv.value, int(kv.mod_revision),
              int(kv.create_revision), int(kv.lease))

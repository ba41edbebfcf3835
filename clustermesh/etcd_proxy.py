"""The read-only endpoint other clusters reach: it forwards reads and watches, nothing else.

etcd 3.4 checks key permissions on Range, Put, DeleteRange, Txn and Watch, but lets any
authenticated user compact the store, grant leases, list leases and the keys attached to
them (LeaseTimeToLive), read roles, and raise a NOSPACE alarm; while an alarm is raised it
applies DeleteRange, LeaseRevoke and AuthDisable without a permission check. So a `remote`
certificate must never reach etcd itself. Remote clusters hold a certificate of the
cluster's remote CA, which only this proxy trusts; the proxy forwards `KV/Range`,
`Watch/Watch` and `Maintenance/Status` to etcd as the `remote` user (so etcd's role still
limits the keys) and refuses every other method before reading a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from clustermesh.kvstore import _REQUIRE_LEADER, _target, tls_channel_options

log = logging.getLogger(__name__)

RANGE = "/etcdserverpb.KV/Range"
WATCH = "/etcdserverpb.Watch/Watch"
STATUS = "/etcdserverpb.Maintenance/Status"
FORWARDED = (RANGE, WATCH, STATUS)


def _raw(b: bytes) -> bytes:
    return b


class ReadOnlyEtcdProxy:
    """Serve `listen` (host:port) with TLS; forward reads and watches to `upstream`.

    `pki` is the cluster's PKI directory (`make_cluster_pki`): `server.crt` for the
    listener, `remote-ca.crt` to verify clients, `proxy.crt` (CN remote) towards etcd.
    """

    def __init__(self, listen: str, upstream: Sequence[str], pki: Path) -> None:
        self.listen = listen
        target, secure = _target(upstream)
        if not secure:
            raise ValueError("the upstream etcd must be https")
        self._upstream_creds = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.crt").read_bytes(),
            private_key=(pki / "proxy.key").read_bytes(),
            certificate_chain=(pki / "proxy.crt").read_bytes())
        self._server_creds = grpc.ssl_server_credentials(
            [((pki / "server.key").read_bytes(), (pki / "server.crt").read_bytes())],
            root_certificates=(pki / "remote-ca.crt").read_bytes(),
            require_client_auth=True)
        self._target = target
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._channel = grpc.aio.secure_channel(self._target, self._upstream_creds,
                                                options=tls_channel_options(self._target))
        # A remote's node opens a handful of watches; a connection gets no more than this.
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024),
                                                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                                                ("grpc.max_concurrent_streams", 64)])
        self._server.add_generic_rpc_handlers([_Handler(self._channel)])
        self.port = self._server.add_secure_port(self.listen, self._server_creds)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await self._server.start()
        log.info("read-only etcd endpoint on %s, forwarding to %s", self.listen, self._target)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def serve(self) -> None:
        """Start, then run until cancelled."""
        await self.start()
        try:
            assert self._server is not None
            await self._server.wait_for_termination()
        finally:
            await asyncio.shield(self.stop())


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no type hints
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._range = channel.unary_unary(RANGE, request_serializer=_raw, response_deserializer=_raw)
        self._status = channel.unary_unary(STATUS, request_serializer=_raw,
                                           response_deserializer=_raw)
        self._watch = channel.stream_stream(WATCH, request_serializer=_raw,
                                            response_deserializer=_raw)

    def service(self, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = call.method
        if method == RANGE:
            return grpc.unary_unary_rpc_method_handler(self._unary(self._range), _raw, _raw)
        if method == STATUS:
            return grpc.unary_unary_rpc_method_handler(self._unary(self._status), _raw, _raw)
        if method == WATCH:
            return grpc.stream_stream_rpc_method_handler(self._forward_watch, _raw, _raw)
        # Refused before any message is read, so one handler fits every call shape.
        return grpc.stream_stream_rpc_method_handler(_refusal(method), _raw, _raw)

    @staticmethod
    def _unary(upstream: Any) -> Any:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            remaining = context.time_remaining()
            try:
                return bytes(await upstream(request, timeout=remaining, metadata=_REQUIRE_LEADER))
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
                raise  # abort raises; this keeps the type checker informed
        return forward

    async def _forward_watch(self, requests: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # a member without a leader refuses, so a remote sees the quorum loss, not silence
        call = self._watch(requests, metadata=_REQUIRE_LEADER)
        try:
            async for response in call:
                yield bytes(response)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
        finally:
            call.cancel()


def _refusal(method: str) -> Any:
    async def refuse(_requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is not served: this endpoint forwards only reads and watches")
        yield b""  # never reached; makes this an async generator
    return refuse

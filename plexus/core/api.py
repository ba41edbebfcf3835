"""The agent's local API: JSON over HTTP on a unix socket, plus /metrics over TCP.

Modules register routes on `Routes`; only this file knows aiohttp. The client side is
in `plexus.core.client`, stdlib-only, so short-lived callers (CNI plugin, CLI) start fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

JsonHandler = Callable[[dict[str, str], Any], Awaitable[Any]]
StreamHandler = Callable[[dict[str, str]], AsyncIterator[Any]]


class ApiError(Exception):
    """Raised by a handler to answer with `status` and a message."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


@dataclass
class _Route:
    method: str
    path: str
    handler: JsonHandler | None = None
    stream: StreamHandler | None = None


class Routes:
    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._static: list[tuple[str, Path, str]] = []

    def get(self, path: str, handler: JsonHandler) -> None:
        self._routes.append(_Route("GET", path, handler))

    def post(self, path: str, handler: JsonHandler) -> None:
        self._routes.append(_Route("POST", path, handler))

    def delete(self, path: str, handler: JsonHandler) -> None:
        self._routes.append(_Route("DELETE", path, handler))

    def stream(self, path: str, handler: StreamHandler) -> None:
        """A GET that answers newline-delimited JSON until the client goes away. A handler
        that is a plain function returning the iterator may raise ApiError first."""
        self._routes.append(_Route("GET", path, stream=handler))

    def static(self, prefix: str, directory: Path, index: str = "index.html") -> None:
        """Files of `directory` under `prefix`; `prefix` itself answers `index`."""
        self._static.append((prefix, directory, index))

    def paths(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self._routes]

    def _aiohttp(self, middlewares: list[Any] | None = None) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=middlewares or [])
        for r in self._routes:
            app.router.add_route(r.method, r.path, _wrap(r))
        for prefix, directory, index in self._static:
            page = directory / index

            async def index_page(_request: web.Request, page: Path = page) -> web.StreamResponse:
                return web.FileResponse(page, headers={"Cache-Control": "no-store"})

            app.router.add_get(prefix, index_page)
            app.router.add_static(prefix.rstrip("/") + "/static", directory)
        return app


def _wrap(route: _Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        query = dict(request.query) | dict(request.match_info)
        if route.stream is not None:
            try:  # a handler that refuses its query does so before it yields anything
                items = route.stream(query)
            except ApiError as e:
                return web.json_response({"error": e.message, **e.details}, status=e.status)
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            try:
                await _write_lines(resp, items)
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            return resp
        body: Any = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": "request body is not valid JSON"}, status=400)
        try:
            assert route.handler is not None
            result = await route.handler(query, body)
        except ApiError as e:
            return web.json_response({"error": e.message, **e.details}, status=e.status)
        return web.json_response(result, dumps=lambda o: json.dumps(o, default=str))

    return handle


MAX_PENDING_LINES = 4096


async def _write_lines(resp: web.StreamResponse, items: AsyncIterator[Any]) -> None:
    """`items` as JSON lines; what the handler has ready at once goes out in one write (one
    TLS record and one syscall for a burst, not one per line). At most MAX_PENDING_LINES wait
    for the writer: past that the handler waits, and its own bounds apply."""
    pending: list[bytes] = []
    ready, room = asyncio.Event(), asyncio.Event()
    room.set()
    finished = False

    async def produce() -> None:
        nonlocal finished
        try:
            async for item in items:
                pending.append(json.dumps(item).encode() + b"\n")
                ready.set()
                if len(pending) >= MAX_PENDING_LINES:
                    room.clear()
                    await room.wait()
        finally:
            finished = True
            ready.set()

    producer = asyncio.ensure_future(produce())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                chunk = b"".join(pending)
                pending.clear()
                room.set()
                await resp.write(chunk)
            if finished and not pending:
                break
        await producer  # its error, if it failed
    finally:
        producer.cancel()
        try:
            await producer
        except (asyncio.CancelledError, Exception):
            pass


class ApiServer:
    """Serves `routes` on a unix socket and, when `metrics_port` is set, /metrics on TCP
    (and /healthz there too when `healthz` is given: 200 when its answer says "ok", else 503)."""

    def __init__(self, routes: Routes, socket_path: Path, registry: CollectorRegistry,
                 metrics_address: str = "127.0.0.1", metrics_port: int | None = None,
                 healthz: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.routes = routes
        self.socket_path = socket_path
        self.registry = registry
        self.metrics_address = metrics_address
        self.metrics_port = metrics_port
        self.healthz = healthz
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        runner = web.AppRunner(self.routes._aiohttp(), access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, 0o660)
        self._runners.append(runner)
        if self.metrics_port is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            if self.healthz is not None:
                app.router.add_get("/healthz", self._healthz)
            mrunner = web.AppRunner(app, access_log=None)
            await mrunner.setup()
            await web.TCPSite(mrunner, self.metrics_address, self.metrics_port).start()
            self._runners.append(mrunner)

    async def _metrics(self, _request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(self.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def _healthz(self, _request: web.Request) -> web.Response:
        assert self.healthz is not None
        answer = await self.healthz()
        return web.json_response(answer, status=200 if answer.get("ok") else 503,
                                 dumps=lambda o: json.dumps(o, default=str))

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.socket_path.unlink(missing_ok=True)


class TcpServer:
    """Serves `routes` over TCP; with `tls` (a server context that requires client
    certificates) only to clients whose certificate's common name is in `allowed_names`."""

    def __init__(self, routes: Routes, address: str, port: int, tls: ssl.SSLContext | None = None,
                 allowed_names: tuple[str, ...] = ()) -> None:
        self.routes = routes
        self.address = address
        self.port = port
        self.tls = tls
        self.allowed_names = allowed_names
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        middlewares = []
        if self.tls is not None:
            from plexus.core.tls import common_name

            allowed = self.allowed_names

            @web.middleware
            async def only_allowed(request: web.Request, handler: Any) -> web.StreamResponse:
                peer = request.transport.get_extra_info("peercert") if request.transport else None
                name = common_name(peer)
                if allowed and name not in allowed:
                    return web.json_response({"error": f"certificate {name!r} is not allowed here"},
                                             status=403)
                resp: web.StreamResponse = await handler(request)
                return resp

            middlewares.append(only_allowed)
        runner = web.AppRunner(self.routes._aiohttp(middlewares), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.address, self.port, ssl_context=self.tls)
        await site.start()
        if self.port == 0:  # the port the kernel chose
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class StreamError(Exception):
    """A stream could not be opened or broke off; says where and why."""


async def stream_ndjson(url: str, query: dict[str, str], tls: ssl.SSLContext | None = None,
                        connect_timeout: float = 5.0,
                        opened: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    """The JSON lines a `Routes.stream` route at `url` answers, until it ends; `opened` is
    called once the server accepted the request."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, params=query, ssl=tls if tls is not None else False) as resp:
            if resp.status >= 400:
                text = await resp.text()
                raise StreamError(f"{url}: {resp.status} {text[:300]}")
            if opened is not None:
                opened()
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        raise StreamError(f"{url}: {type(e).__name__}: {e}") from None

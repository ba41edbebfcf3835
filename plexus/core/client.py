"""Client of the agent's local API: stdlib only, so the CNI plugin and the CLI start fast."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()  # a refused connect must not leak the socket
            raise
        self.sock = sock


class ClientError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Client:
    """Talks to an agent's unix socket; raises ClientError with the agent's message."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _conn(self) -> _UnixConnection:
        return _UnixConnection(self.socket_path, self.timeout)

    def request(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        q = {k: v for k, v in query.items() if v is not None}
        url = path + (f"?{urlencode(q)}" if q else "")
        conn = self._conn()
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, url, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ClientError(
                    0, f"agent is not running (no API at {self.socket_path}): {e.strerror}") from None
            except OSError as e:
                raise ClientError(0, f"agent API at {self.socket_path} failed: {e}") from None
            try:
                decoded = json.loads(data) if data else None
            except ValueError:
                decoded = None
                if resp.status < 400:
                    raise ClientError(resp.status, f"agent answered something that is not JSON: "
                                                   f"{data[:200]!r}") from None
            if resp.status >= 400:
                text = data.decode(errors="replace")
                msg = decoded.get("error", text) if isinstance(decoded, dict) else text
                raise ClientError(resp.status, msg, decoded)
            return decoded
        finally:
            conn.close()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, **query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)

    def stream(self, path: str, **query: Any) -> Iterator[Any]:
        q = {k: v for k, v in query.items() if v is not None}
        conn = _UnixConnection(self.socket_path, timeout=None)
        try:
            try:
                conn.request("GET", path + (f"?{urlencode(q)}" if q else ""))
                resp = conn.getresponse()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ClientError(
                    0, f"agent is not running (no API at {self.socket_path}): {e.strerror}") from None
            if resp.status >= 400:
                data = resp.read()
                try:
                    msg = json.loads(data).get("error", data.decode(errors="replace"))
                except (ValueError, AttributeError):
                    msg = data.decode(errors="replace")
                raise ClientError(resp.status, msg)
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()

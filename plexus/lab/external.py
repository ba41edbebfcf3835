"""The lab's external server (`plx-ext`): what a firewall beyond the egress gateway sees.

Every TCP connection to it on `PORT` is answered with one line of JSON, the source address and
port it arrived from, and recorded; then whatever the client sends is echoed back until it
closes, so a test can keep one connection open across a change. `GET /clients` on
`QUERY_PORT` lists what was recorded (`?since=N`: from the N-th on), so a test can ask which
addresses reached it, not only what one client was told.

Run as `python -m plexus.lab.external --bind ADDR --state-dir DIR` inside `plx-ext`; the
state dir is in the argv so the lab knows the process it started by its own marker.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PORT = 8080        # answers who it saw
QUERY_PORT = 8081  # the record, over HTTP


class Record:
    """Who connected, in order; shared by both servers' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[dict[str, Any]] = []

    def add(self, ip: str, port: int) -> dict[str, Any]:
        with self._lock:
            row = {"seq": len(self._seen), "ip": ip, "port": port, "time": time.time()}
            self._seen.append(row)
            return row

    def since(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._seen[max(seq, 0):])


class _Answer(socketserver.BaseRequestHandler):
    server: _AnswerServer

    def handle(self) -> None:
        ip, port = self.client_address[:2]
        row = self.server.record.add(ip, port)
        self.request.sendall(json.dumps({"ip": ip, "port": port, "seq": row["seq"]}).encode() + b"\n")
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            return  # the client went; nothing to record


class _AnswerServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], record: Record) -> None:
        self.record = record
        super().__init__(bind, _Answer)


class _Query(BaseHTTPRequestHandler):
    server: _QueryServer

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path != "/clients":
            self.send_error(404, f"no {url.path}; GET /clients[?since=N]")
            return
        raw = parse_qs(url.query).get("since", ["0"])[0]
        if not raw.isdigit():
            self.send_error(400, f"since={raw!r}: expected a non-negative integer")
            return
        body = json.dumps({"clients": self.server.record.since(int(raw))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # every connection is in the record already


class _QueryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], record: Record) -> None:
        self.record = record
        super().__init__(bind, _Query)


class External:
    """Both servers on one record, each serving on a thread of its own until `close`."""

    def __init__(self, bind: str, port: int = PORT, query_port: int = QUERY_PORT) -> None:
        self.record = Record()
        self.answer = _AnswerServer((bind, port), self.record)
        self.query = _QueryServer((bind, query_port), self.record)
        self.threads = [threading.Thread(target=s.serve_forever, name=name, daemon=True)
                        for name, s in (("answer", self.answer), ("query", self.query))]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        for s in (self.answer, self.query):
            s.shutdown()
            s.server_close()


def main() -> None:
    p = argparse.ArgumentParser(prog="plexus.lab.external", description=__doc__)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--query-port", type=int, default=QUERY_PORT)
    p.add_argument("--state-dir", required=True, help="the lab's directory (marks the process)")
    args = p.parse_args()
    ext = External(args.bind, args.port, args.query_port)
    print(f"external server on {args.bind}:{args.port}, record on "
          f"http://{args.bind}:{args.query_port}/clients", flush=True)
    for t in ext.threads:
        t.join()


if __name__ == "__main__":
    main()

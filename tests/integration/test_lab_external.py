"""The lab's external server on loopback: each client is told, and the record says, the
address it came from."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from plexus.lab.external import External
from tests.support import free_port


@pytest.fixture
def ext() -> Iterator[External]:
    server = External("127.0.0.1", free_port(), free_port())
    try:
        yield server
    finally:
        server.close()


def ask(ext: External, source: str) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", ext.answer.server_address[1]), timeout=5,
                                  source_address=(source, 0)) as s:
        answer: dict[str, object] = json.loads(s.makefile().readline())
        return answer


def clients(ext: External, query: str = "") -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{ext.query.server_address[1]}/clients{query}"
    with urllib.request.urlopen(url, timeout=5) as r:
        rows: list[dict[str, object]] = json.loads(r.read())["clients"]
        return rows


def test_each_client_is_told_and_recorded_by_its_source_address(ext: External) -> None:
    first = ask(ext, "127.0.0.1")
    second = ask(ext, "127.0.0.2")
    assert (first["ip"], first["seq"]) == ("127.0.0.1", 0)
    assert (second["ip"], second["seq"]) == ("127.0.0.2", 1)
    assert [(c["ip"], c["port"]) for c in clients(ext)] == [
        ("127.0.0.1", first["port"]), ("127.0.0.2", second["port"])]
    assert [c["ip"] for c in clients(ext, "?since=1")] == ["127.0.0.2"]


def test_a_bad_query_is_refused_naming_what_was_wrong(ext: External) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        clients(ext, "?since=-1")
    body = e.value.read().decode()
    e.value.close()
    assert e.value.code == 400 and "since='-1'" in body
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{ext.query.server_address[1]}/nothing", timeout=5)
    e.value.close()
    assert e.value.code == 404

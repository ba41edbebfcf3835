from __future__ import annotations

import argparse
from typing import Any

import pytest

from plexus.commands import bpf

ROWS = [
    {"endpoint": "default/web", "ifindex": 3, "direction": "ingress", "source": "10.1.1.2",
     "destination": "10.1.1.1", "sourcePort": 0, "destinationPort": 0, "protocol": 1,
     "expiresIn": 50.2, "service": False, "closing": False},
    {"endpoint": "default/db", "ifindex": 4, "direction": "egress", "source": "fd00::1",
     "destination": "fd00::2", "sourcePort": 8080, "destinationPort": 40000, "protocol": 6,
     "expiresIn": 9.2, "service": True, "closing": True},
]


class FakeClient:
    def get(self, path: str) -> list[dict[str, Any]]:
        assert path == "/v1/bpf/ct"
        return ROWS


def test_ct_list_table_and_endpoint_filter(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bpf, "client", lambda _args: FakeClient())
    assert bpf._ct(argparse.Namespace(endpoint=None, output="table")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ENDPOINT", "DIRECTION", "PROTO", "SOURCE", "DESTINATION", "EXPIRES"]
    assert lines[1].split() == ["default/web", "INGRESS", "ICMP", "10.1.1.2", "10.1.1.1", "50s"]
    assert lines[2].split() == ["default/db", "EGRESS", "TCP", "[fd00::1]:8080", "[fd00::2]:40000", "9s",
                                "service", "closing"]
    assert bpf._ct(argparse.Namespace(endpoint="default/db", output="table")) == 0
    out = capsys.readouterr().out
    assert "default/db" in out and "default/web" not in out

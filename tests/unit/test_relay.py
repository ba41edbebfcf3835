"""The relay's pure parts: merging in time order within a window, its rate, its config."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpf.flows import Flow, Peer
from plexus.core.config import ConfigError, load
from plexus.relay.config import RelayConfig
from plexus.relay.module import Merger, Rate


def flow(t: int, node: str = "east/n1") -> Flow:
    return Flow(time_ns=t, node=node, kind="policy-verdict", verdict="FORWARDED", direction="EGRESS",
                protocol="TCP", source=Peer("10.0.0.1"), destination=Peer("10.0.0.2"))


def test_merger_passes_on_in_time_order_once_the_window_passed() -> None:
    m = Merger(window_ns=100)
    for t, node in ((50, "west/n1"), (10, "east/n1"), (30, "east/n2")):
        m.push(flow(t, node))
    assert list(m.pop_ready(now_ns=120, passed_ns=0)) == [flow(10, "east/n1")]   # 30 and 50 still wait
    assert [f.time_ns for f in m.pop_ready(now_ns=200, passed_ns=10)] == [30, 50]
    m.push(flow(40))  # older than what was passed on already
    assert [f.time_ns for f in m.pop_ready(now_ns=500, passed_ns=50)] == [40]
    assert m.late == 1


def test_rate_counts_the_last_full_seconds() -> None:
    r = Rate(span=2)
    r.add(10, now=100.1)
    r.add(30, now=101.5)
    r.add(99, now=102.2)  # the current second is not counted yet
    assert r.per_second(now=102.9) == (10 + 30) / 2
    assert r.per_second(now=110) == 0


def test_config_names_the_bad_field(tmp_path: Path) -> None:
    good = tmp_path / "relay.yaml"
    good.write_text("cluster: {name: east, id: 1}\netcd: {endpoints: ['https://172.31.1.250:2379']}\n"
                    "relay: {nodeTls: {west: {caFile: /a, certFile: /b, keyFile: /c}}, mergeWindowMs: 200}\n")
    cfg = load(RelayConfig, good)
    assert cfg.relay.merge_window_ms == 200 and cfg.listen.port == 4245 and cfg.relay.node_port == 4244
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {name: east, id: 1}\netcd: {endpoints: []}\nrelay: {mergeWindow: 5}\n")
    with pytest.raises(ConfigError, match="mergeWindow"):
        load(RelayConfig, bad)

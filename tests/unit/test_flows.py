"""Flows: Hubble's JSON both ways, filters (combined, negated), the ring, the observe CLI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bpf.flows import (
    Criterion,
    FilterError,
    Flow,
    FlowFilter,
    FlowRing,
    Peer,
    parse_since,
    parse_time,
    rfc3339,
)
from plexus.commands import observe

T0 = 1_780_000_000_123_456_789


def flow(**kw: Any) -> Flow:
    base: dict[str, Any] = dict(
        time_ns=T0, node="east/n1", kind="policy-verdict", verdict="DROPPED", direction="INGRESS",
        protocol="TCP",
        source=Peer("10.2.1.5", 43210, 131077, ("k8s:app=pclient", "k8s:io.kubernetes.pod.namespace=default",
                                                "k8s:io.cilium.k8s.policy.cluster=west"),
                    "default", "pcl", "west"),
        destination=Peer("10.1.1.7", 8080, 65540, ("k8s:app=web",), "default", "pweb", "east"),
        drop_reason="POLICY_DENIED", tcp_flags=0x02)
    base.update(kw)
    return Flow(**base)


def test_hubble_json_shape() -> None:
    doc = flow().to_json()
    assert set(doc) == {"flow", "node_name", "time"}
    f = doc["flow"]
    assert doc["node_name"] == f["node_name"] == "east/n1"
    assert f["time"] == doc["time"] == "2026-05-28T20:26:40.123456789Z"
    assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENIED" and f["drop_reason"] == 133
    assert f["IP"] == {"source": "10.2.1.5", "destination": "10.1.1.7", "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 43210, "destination_port": 8080, "flags": {"SYN": True}}}
    assert f["source"]["pod_name"] == "pcl" and f["source"]["namespace"] == "default"
    assert f["source"]["identity"] == 131077 and f["source"]["cluster_name"] == "west"
    assert "k8s:app=pclient" in f["source"]["labels"]
    assert f["Type"] == "L3_L4" and f["traffic_direction"] == "INGRESS" and f["is_reply"] is False
    assert f["event_type"] == {"type": 1, "sub_type": 133}
    assert f["Summary"] == "TCP Flags: SYN"
    forwarded = flow(verdict="FORWARDED", drop_reason="").to_json()["flow"]
    assert forwarded["event_type"] == {"type": 5} and "drop_reason_desc" not in forwarded
    udp = flow(protocol="UDP", tcp_flags=0).to_json()["flow"]
    assert udp["l4"] == {"UDP": {"source_port": 43210, "destination_port": 8080}}
    v6 = flow(source=Peer("fd00::1", 1), destination=Peer("fd00::2", 2)).to_json()["flow"]
    assert v6["IP"]["ipVersion"] == "IPv6"
    svc = flow(kind="translation", verdict="TRANSLATED", drop_reason="", service="default/lbweb")
    assert svc.to_json()["flow"]["destination_service"] == {"name": "lbweb", "namespace": "default"}


@pytest.mark.parametrize("f", [
    flow(), flow(verdict="FORWARDED", drop_reason="", tcp_flags=0x12),
    flow(protocol="UDP", tcp_flags=0),
    flow(kind="translation", verdict="TRANSLATED", drop_reason="", service="default/lbweb",
         direction="EGRESS"),
    flow(protocol="ICMPv4", tcp_flags=0, source=Peer("10.0.0.1"), destination=Peer("10.0.0.2")),
    flow(kind="egress-gateway", verdict="TRANSLATED", drop_reason="", direction="EGRESS",
         node="east/n2", egress_policy="east/default/legacy-db", egress_ip="10.255.0.10",
         egress_port=43210),
])
def test_json_round_trip(f: Flow) -> None:
    assert Flow.from_json(json.loads(json.dumps(f.to_json()))) == f


def test_time_round_trip_and_errors() -> None:
    assert parse_time(rfc3339(T0)) == T0
    assert parse_time("2026-05-28T22:26:40.5+02:00") == 1_780_000_000_500_000_000
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        parse_time("yesterday")
    assert parse_since("5m", now_ns=T0) == T0 - 300 * 10**9
    assert parse_since("1h30m", now_ns=T0) == T0 - 5400 * 10**9
    assert parse_since(rfc3339(T0)) == T0
    with pytest.raises(FilterError, match="neither a duration"):
        parse_since("soon")


@pytest.mark.parametrize(("criteria", "expected"), [
    ([("pod", ["default/pweb"])], True),
    ([("pod", ["pw"])], True),                         # a name prefix in any namespace
    ([("pod", ["kube-system/"])], False),              # a namespace alone
    ([("from-pod", ["default/pweb"])], False),         # pweb is the destination
    ([("to-pod", ["default/pweb"])], True),
    ([("namespace", ["default"])], True),
    ([("label", ["app=web"])], True),
    ([("label", ["k8s:app=web"])], True),
    ([("from-label", ["app=web"])], False),
    ([("label", ["app"])], True),
    ([("identity", ["131077"])], True),
    ([("to-identity", ["131077"])], False),
    ([("cluster", ["west"])], True),
    ([("from-cluster", ["east"])], False),
    ([("ip", ["10.2.0.0/16"])], True),
    ([("to-ip", ["10.2.0.0/16"])], False),
    ([("ip", ["10.1.1.7"])], True),
    ([("port", ["8080"])], True),
    ([("from-port", ["8080"])], False),
    ([("protocol", ["tcp"])], True),
    ([("protocol", ["udp", "tcp"])], True),            # values of one filter: any of them
    ([("verdict", ["dropped"])], True),
    ([("drop-reason", ["POLICY_DENIED"])], True),
    ([("type", ["translation"])], False),
    ([("node", ["east/n1"])], True),
    ([("node", ["east-n1"])], True),
    ([("verdict", ["DROPPED"]), ("from-cluster", ["west"])], True),   # all filters must hold
    ([("verdict", ["DROPPED"]), ("from-cluster", ["east"])], False),
    ([("verdict", ["DROPPED"], True)], False),        # negated
    ([("cluster", ["north"], True), ("port", ["8080"])], True),
])
def test_filters(criteria: list[Any], expected: bool) -> None:
    assert FlowFilter.of(*criteria).matches(flow()) is expected


def test_filter_query_round_trip_and_errors() -> None:
    flt = FlowFilter.of(("pod", ["default/a", "b"]), ("verdict", ["DROPPED"], True))
    assert FlowFilter.from_query(flt.to_query()) == flt
    assert FlowFilter.from_query(None) == FlowFilter()
    for bad, why in ((("ip", ["10.0.0.300"]), "not an IP or CIDR"), (("port", ["http"]), "not a number"),
                     (("verdict", ["MAYBE"]), "not one of"), (("colour", ["red"]), "no such filter"),
                     (("type", ["l7"]), "not one of")):
        with pytest.raises(FilterError, match=why):
            FlowFilter.of(bad)
    with pytest.raises(FilterError, match="expected a JSON list"):
        FlowFilter.from_query("{not json")
    with pytest.raises(FilterError, match="needs a value"):
        Criterion("pod", ()).check()


def test_cli_filters_in_order_with_not() -> None:
    args = observe.parse(["--verdict", "DROPPED", "--not", "--from-cluster", "east", "--pod", "default/a",
                          "--pod", "default/b", "--since", "5m", "-o", "json"])
    flt = observe.flow_filter(args)
    assert flt.criteria == (Criterion("verdict", ("DROPPED",)), Criterion("from-cluster", ("east",), True),
                            Criterion("pod", ("default/a", "default/b")))
    q = observe.query(args)
    assert q["since"] == "5m" and q["follow"] is None and FlowFilter.from_query(q["filters"]) == flt
    assert observe.flow_filter(observe.parse(["--node-name", "east/n1"])).criteria == (
        Criterion("node", ("east/n1",)),)
    bad = observe.parse(["--ip", "nope"])
    with pytest.raises(FilterError, match="not an IP"):
        observe.flow_filter(bad)


def test_compact_line() -> None:
    line = observe.render(flow().to_json(), "compact")
    assert "[east/n1]" in line
    assert "east/default/pweb (10.1.1.7):8080 <- west/default/pcl (10.2.1.5):43210" in line
    assert line.endswith("policy-verdict DROPPED (POLICY_DENIED) (TCP SYN)")
    lost = {"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 3}, "node_name": "east/n1"}
    assert observe.render(lost, "compact") == "EVENTS LOST: PERF_EVENT_RING_BUFFER 3 [east/n1]"


async def test_ring_last_since_follow_and_lost() -> None:
    ring = FlowRing(capacity=4, node="east/n1", queue_size=2)
    for i in range(6):
        ring.record(flow(time_ns=T0 + i, source=Peer("10.2.1.5", 1000 + i)))
    assert [f.source.port for f in ring.recent(FlowFilter())] == [1002, 1003, 1004, 1005]  # bounded
    assert [f.source.port for f in ring.recent(FlowFilter(), last=2)] == [1004, 1005]
    assert [f.source.port for f in ring.recent(FlowFilter(), since_ns=T0 + 5)] == [1005]
    assert ring.recent(FlowFilter(), last=0) == []
    assert ring.recent(FlowFilter.of(("from-port", ["1003"]))) == [ring.flows[1]]

    stream = ring.observe(FlowFilter.of(("verdict", ["DROPPED"])), last=1, follow=True)
    first = await anext(stream)
    assert Flow.from_json(first).source.port == 1005
    ring.lost(7)
    ring.record(flow(time_ns=T0 + 10, verdict="FORWARDED", drop_reason=""))  # filtered out
    for i in range(4):  # the reader's queue holds 2: two are lost to it
        ring.record(flow(time_ns=T0 + 20 + i))
    docs = [await asyncio.wait_for(anext(stream), 1) for _ in range(4)]
    assert docs[0] == {"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 7},
                       "node_name": "east/n1", "time": docs[0]["time"]}
    assert docs[1]["lost_events"] == {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": 2}
    assert [Flow.from_json(d).time_ns for d in docs[2:]] == [T0 + 20, T0 + 21]
    await stream.aclose()
    assert not ring.subscribers
    assert ring.status() == {"capacity": 4, "flows": 4, "seen": 11, "lostPerfBuffer": 7, "lostSlowReaders": 2}
    with pytest.raises(ValueError, match="at least 1"):
        FlowRing(capacity=0)


def test_ring_keeps_time_order_when_a_flow_comes_late() -> None:
    ring = FlowRing(capacity=3)
    for t in (10, 30, 20, 40, 5):
        ring.record(flow(time_ns=t))
    assert [f.time_ns for f in ring.flows] == [20, 30, 40]  # 5 was older than all kept


def test_flow_metrics_bounded_namespaces() -> None:
    from bpf import metrics

    ring = FlowRing()
    m = metrics.FlowMetrics(ring)
    m.observe(flow())
    m.observe(flow(verdict="FORWARDED", drop_reason=""))
    for i in range(metrics.MAX_NAMESPACES + 10):
        m.observe(flow(source=Peer("10.0.0.1", namespace=f"ns{i}"), destination=Peer("10.0.0.2")))
    fams = {f.name: f for f in m.collect()}
    processed = {tuple(s.labels.values()): s.value for s in fams["plexus_flows_processed"].samples}
    assert processed[("policy-verdict", "DROPPED", "TCP", "INGRESS")] == metrics.MAX_NAMESPACES + 11
    assert processed[("policy-verdict", "FORWARDED", "TCP", "INGRESS")] == 1
    by_ns = fams["plexus_flows_dropped_by_namespace"].samples
    assert len({s.labels["source_namespace"] for s in by_ns}) == metrics.MAX_NAMESPACES + 1  # the rest: other
    # "default" took a place first: 11 of the 42 went over
    assert sum(s.value for s in by_ns if s.labels["source_namespace"] == "other") == 11
    assert {s.labels["reason"] for s in fams["plexus_flows_dropped"].samples} == {"POLICY_DENIED"}


def test_the_web_page_knows_the_same_filters_as_the_cli() -> None:
    import re
    from pathlib import Path

    from bpf.flows import FIELDS

    js = (Path(__file__).resolve().parents[2] / "plexus" / "relay" / "web" / "app.js").read_text()
    listed = re.search(r"const FIELDS = \[(.*?)\];", js, re.S)
    assert listed is not None
    assert tuple(re.findall(r'"([a-z-]+)"', listed[1])) == FIELDS


def test_a_changed_copy_is_written_anew() -> None:
    import dataclasses

    f = flow()
    assert f.to_json()["flow"]["verdict"] == "DROPPED"  # now cached
    g = dataclasses.replace(f, verdict="FORWARDED", drop_reason="")
    assert g.to_json()["flow"]["verdict"] == "FORWARDED" and "drop_reason_desc" not in g.to_json()["flow"]


def test_an_egress_gateway_flow_names_policy_gateway_and_egress_ip() -> None:
    f = flow(kind="egress-gateway", verdict="TRANSLATED", drop_reason="", direction="EGRESS",
             node="east/n2", destination=Peer("198.51.100.10", 8080, 2, ("reserved:world",)),
             egress_policy="east/default/legacy-db", egress_ip="10.255.0.10", egress_port=40001)
    doc = f.to_json()["flow"]
    assert doc["egress_gateway"] == {"policy": "east/default/legacy-db", "gateway": "east/n2",
                                     "egress_ip": "10.255.0.10", "egress_port": 40001}
    assert doc["event_type"] == {"type": 4} and doc["traffic_direction"] == "EGRESS"
    line = f.compact()
    assert "west/default/pcl (10.2.1.5):43210 -> 198.51.100.10 (ID:2):8080 by " \
           "east/default/legacy-db through east/n2 as 10.255.0.10:40001 egress-gateway " \
           "TRANSLATED" in line, line
    assert FlowFilter.of(("type", ["egress-gateway"])).matches(f)
    assert not FlowFilter.of(("type", ["egress-gateway"])).matches(flow())

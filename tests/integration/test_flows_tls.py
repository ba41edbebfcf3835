"""A node's flow server on loopback with the lab's PKI: the relay's certificate streams flows;
no certificate, another cluster's CA, or another name of the same CA gets nothing."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from bpf.flows import Flow, FlowFilter, FlowRing, Peer
from clustermesh.pki import make_cluster_pki, make_flows_pki
from plexus.core.api import Routes, StreamError, TcpServer, stream_ndjson
from plexus.core.tls import client_context, server_context


def flow(port: int) -> Flow:
    return Flow(time_ns=1_780_000_000_000_000_000 + port, node="east/n1", kind="policy-verdict",
                verdict="DROPPED", direction="INGRESS", protocol="TCP", source=Peer("10.2.1.5", port),
                destination=Peer("10.1.1.7", 8080), drop_reason="POLICY_DENIED")


async def first(url: str, tls: ssl.SSLContext | None, query: dict[str, str]) -> list[Any]:
    return [doc async for doc in stream_ndjson(url, query, tls, connect_timeout=3)]


async def test_only_the_relay_certificate_of_the_cluster_ca_gets_flows(tmp_path: Path) -> None:
    east, west = tmp_path / "east", tmp_path / "west"
    for name, d in (("east", east), ("west", west)):
        make_cluster_pki(name, d, ["127.0.0.1"])
        make_flows_pki(name, d, {"n1": "127.0.0.1"})
    ring = FlowRing(node="east/n1")
    for p in (1000, 1001, 1002):
        ring.record(flow(p))
    routes = Routes()
    routes.stream("/v1/observe", lambda q: ring.observe(FlowFilter.from_query(q.get("filters")), last=10))
    server = TcpServer(routes, "127.0.0.1", 0, server_context(east / "ca.crt", east / "flows-n1.crt",
                                                               east / "flows-n1.key"), ("relay",))
    await server.start()
    url = f"https://127.0.0.1:{server.port}/v1/observe"
    try:
        relay = client_context(east / "ca.crt", east / "relay.crt", east / "relay.key")
        docs = await first(url, relay, {"filters": FlowFilter.of(("from-port", ["1001", "1002"])).to_query()})
        assert [Flow.from_json(d).source.port for d in docs] == [1001, 1002]

        # no client certificate: the handshake fails
        bare = ssl.create_default_context(cafile=str(east / "ca.crt"))
        with pytest.raises(StreamError):
            await first(url, bare, {})
        # the right name from another cluster's CA: refused in the handshake
        foreign = client_context(east / "ca.crt", west / "relay.crt", west / "relay.key")
        with pytest.raises(StreamError):
            await first(url, foreign, {})
        # the cluster's CA, another name (the etcd admin): refused by name
        admin = client_context(east / "ca.crt", east / "admin.crt", east / "admin.key")
        with pytest.raises(StreamError, match=r"403.*not allowed"):
            await first(url, admin, {})
        # and the server must prove itself: a relay trusting only west's CA will not talk to it
        doubting = client_context(west / "ca.crt", west / "relay.crt", west / "relay.key")
        with pytest.raises(StreamError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await first(url, doubting, {})
    finally:
        await server.stop()

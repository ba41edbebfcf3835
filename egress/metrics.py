"""Prometheus metrics of the egress gateway, beyond the reconciler's own.

`plexus_egress_snat_connections` is read from the gateway's NAT map at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class EgressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.gateway_healthy = Gauge(
            "plexus_egress_gateway_healthy",
            "1 when this node sees the gateway of the policy as healthy, 0 when not.",
            ["policy", "gateway"], registry=registry)
        self.failovers = Counter(
            "plexus_egress_gateway_failovers_total",
            "Times a source node's traffic of the policy moved away from its active gateway.",
            ["policy", "source_node"], registry=registry)
        self.snat_expired = Counter(
            "plexus_egress_snat_expired_total",
            "Translations this gateway swept away once their lifetime ran out.", registry=registry)


class SnatConnections(Collector):
    """Connections this gateway translates now, by egress IP (`read`: the egress IP of each
    entry of the NAT map; empty while the datapath is not loaded)."""

    def __init__(self, read: Callable[[], Iterable[str]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("plexus_egress_snat_connections",
                              "Connections translated to the egress IP on this gateway "
                              "(live entries of its NAT map).", labels=["egress_ip"])
        counts: dict[str, int] = {}
        for ip in self.read():
            counts[ip] = counts.get(ip, 0) + 1
        for ip, n in sorted(counts.items()):
            g.add_metric([ip], float(n))
        yield g

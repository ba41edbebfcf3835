"""Prometheus metrics of the egress gateway, beyond the reconciler's own.

`plexus_egress_snat_connections` is left to the SNAT datapath, which alone can count them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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

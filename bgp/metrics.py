"""Prometheus metrics of the BGP speaker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BGPMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.session_up = Gauge("plexus_bgp_session_up", "1 when the BGP session is established.",
                                ["peer"], registry=registry)
        self.advertised = Gauge("plexus_bgp_advertised_prefixes", "Prefixes announced to the peer.",
                                ["peer"], registry=registry)
        self.updates = Counter("plexus_bgp_updates_total", "Prefixes announced or withdrawn.",
                               ["peer", "op"], registry=registry)
        self.restarts = Counter("plexus_bgp_speaker_restarts_total", "ExaBGP restarts after it died.",
                                registry=registry)

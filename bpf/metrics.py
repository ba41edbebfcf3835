"""Flow metrics, as Hubble's: flows processed by type and verdict, drops by reason and by the
namespaces of their two ends. Label values come from small fixed sets, and namespaces from
at most `MAX_NAMESPACES` (the rest count as `other`), so a busy mesh cannot blow up the
series count."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bpf.flows import Flow, FlowRing

MAX_NAMESPACES = 32
OTHER = "other"


class FlowMetrics(Collector):
    def __init__(self, ring: FlowRing) -> None:
        self.ring = ring
        self.processed: Counter[tuple[str, str, str, str]] = Counter()  # type, verdict, protocol, direction
        self.drops: Counter[tuple[str, str]] = Counter()                # reason, protocol
        self.drops_by_ns: Counter[tuple[str, str, str]] = Counter()     # source ns, destination ns, reason
        self.namespaces: set[str] = set()

    def _ns(self, ns: str) -> str:
        if not ns:
            return ""
        if ns in self.namespaces:
            return ns
        if len(self.namespaces) < MAX_NAMESPACES:
            self.namespaces.add(ns)
            return ns
        return OTHER

    def observe(self, flow: Flow) -> None:
        protocol = flow.protocol if flow.protocol in ("TCP", "UDP", "ICMPv4", "ICMPv6") else "other"
        self.processed[(flow.kind, flow.verdict, protocol, flow.direction)] += 1
        if flow.verdict == "DROPPED":
            self.drops[(flow.drop_reason or "unknown", protocol)] += 1
            self.drops_by_ns[(self._ns(flow.source.namespace), self._ns(flow.destination.namespace),
                              flow.drop_reason or "unknown")] += 1

    def collect(self) -> Iterator[Any]:
        processed = CounterMetricFamily("plexus_flows_processed", "Flows recorded, by type and verdict.",
                                        labels=["type", "verdict", "protocol", "direction"])
        for plabels, n in sorted(self.processed.items()):
            processed.add_metric(list(plabels), float(n))
        yield processed
        drops = CounterMetricFamily("plexus_flows_dropped", "Dropped flows by reason.",
                                    labels=["reason", "protocol"])
        for dlabels, n in sorted(self.drops.items()):
            drops.add_metric(list(dlabels), float(n))
        yield drops
        by_ns = CounterMetricFamily("plexus_flows_dropped_by_namespace",
                                    "Dropped flows by the namespaces of their source and destination.",
                                    labels=["source_namespace", "destination_namespace", "reason"])
        for nlabels, n in sorted(self.drops_by_ns.items()):
            by_ns.add_metric(list(nlabels), float(n))
        yield by_ns
        lost = CounterMetricFamily("plexus_flows_lost", "Flows lost before anyone read them: the "
                                   "kernel's buffer overran, or a reader fell behind.", labels=["source"])
        lost.add_metric(["perf-buffer"], float(self.ring.lost_perf))
        lost.add_metric(["slow-reader"], float(self.ring.lost_readers))
        yield lost
        kept = CounterMetricFamily("plexus_flows_recorded", "Flows the node recorded in its ring.")
        kept.add_metric([], float(self.ring.seen))
        yield kept

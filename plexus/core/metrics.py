"""Prometheus metrics: one registry per agent, injected into whoever emits."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ObjectCounts = Callable[[], dict[str, int]]


class ReconcilerMetrics:
    """Count, duration and errors, the same for every reconciler target, and how many
    objects each reconciler holds in each state (read at scrape time)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._enabled = registry is not None
        self._objects: dict[str, ObjectCounts] = {}
        if registry is None:
            return
        self.total = Counter(
            "plexus_reconcile_total", "Reconcile operations by target, op and outcome.",
            ["target", "op", "outcome"], registry=registry,
        )
        self.duration = Histogram(
            "plexus_reconcile_duration_seconds", "Duration of successful reconcile operations.",
            ["target", "op"], registry=registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        registry.register(_ObjectsCollector(self._objects))

    @classmethod
    def disabled(cls) -> ReconcilerMetrics:
        return cls(None)

    def observe(self, target: str, op: str, seconds: float, *, ok: bool) -> None:
        if not self._enabled:
            return
        self.total.labels(target, op, "ok" if ok else "error").inc()
        if ok:
            self.duration.labels(target, op).observe(seconds)

    def track(self, target: str, counts: ObjectCounts) -> None:
        """Report `counts()` (objects by state) as the target's gauges; a later reconciler
        of the same name takes over."""
        if self._enabled:
            self._objects[target] = counts


class _ObjectsCollector(Collector):
    def __init__(self, sources: dict[str, ObjectCounts]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("plexus_reconcile_objects",
                              "Objects of each reconciler by state (pending, done, error).",
                              labels=["target", "state"])
        for target, counts in list(self.sources.items()):
            for state, n in counts().items():
                g.add_metric([target, state], float(n))
        yield g


class Metrics:
    """The agent's registry plus the shared reconciler metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciler = ReconcilerMetrics(self.registry)

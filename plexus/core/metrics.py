"""Prometheus metrics: one registry per agent, injected into whoever emits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ReconcilerMetrics:
    """Count, duration and errors, the same for every reconciler target."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._enabled = registry is not None
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

    @classmethod
    def disabled(cls) -> ReconcilerMetrics:
        return cls(None)

    def observe(self, target: str, op: str, seconds: float, *, ok: bool) -> None:
        if not self._enabled:
            return
        self.total.labels(target, op, "ok" if ok else "error").inc()
        if ok and op != "prune":
            self.duration.labels(target, op).observe(seconds)


class Metrics:
    """The agent's registry plus the shared reconciler metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciler = ReconcilerMetrics(self.registry)

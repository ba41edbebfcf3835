"""Which gateway is active for each (policy, source node): the first healthy one in the
policy's order, with a hold-down before a recovered, more preferred gateway takes over
again, so a gateway that flaps does not drag traffic back and forth.

Health comes from the gateway health table: a source node's own prober (reporter
`<cluster>/<node>`) and the control plane (reporter `control-plane`). What a source's probes
say decides for that source: traffic goes from it to the gateway, and its probes take that
path. Where a source has no verdict yet (it just started, or the gateway is new to it) the
control plane's does; with no report at all a gateway counts as healthy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from clustermesh.tables import NodeKey
from egress.tables import (
    CONTROL_PLANE,
    ActiveGateway,
    ActiveKey,
    GatewayCandidate,
    GatewayHealth,
    HealthKey,
    PolicyState,
    reporter_of,
)
from plexus.core.clock import Clock

SourceGateway = tuple[NodeKey | None, NodeKey]


def healthy(health: Mapping[HealthKey, GatewayHealth], source: NodeKey | None,
            gateway: NodeKey) -> bool:
    if source is not None and (own := health.get((reporter_of(source), gateway))) is not None:
        return own.healthy
    control = health.get((CONTROL_PLANE, gateway))
    return control is None or control.healthy


class GatewayChooser:
    """Keeps the active gateway of each (policy, source node) and when each gateway last
    recovered, as this source sees it; `choose` is called on every change and when
    `next_deadline` passes."""

    def __init__(self, clock: Clock, hold_down: float) -> None:
        self.clock = clock
        self.hold_down = hold_down
        self.active: dict[ActiveKey, ActiveGateway] = {}
        self.failovers: dict[ActiveKey, int] = {}  # switches away from a gateway, ever
        self._was_healthy: dict[SourceGateway, bool] = {}
        self._recovered: dict[SourceGateway, float] = {}  # healthy again since (in hold-down)

    def _observe(self, source: NodeKey | None, gateway: NodeKey, up: bool, now: float) -> None:
        key = (source, gateway)
        before = self._was_healthy.get(key)
        self._was_healthy[key] = up
        if not up:
            self._recovered.pop(key, None)
        elif before is False:
            self._recovered[key] = now

    def _settled(self, source: NodeKey | None, gateway: NodeKey, now: float) -> bool:
        since = self._recovered.get((source, gateway))
        return since is None or now - since >= self.hold_down

    def choose(self, policies: Iterable[PolicyState],
               health: Mapping[HealthKey, GatewayHealth]) -> dict[ActiveKey, ActiveGateway]:
        now = self.clock.now()
        fresh: dict[ActiveKey, ActiveGateway] = {}
        for p in policies:
            for source in sorted({e.node for e in p.endpoints}, key=lambda s: s or ("", "")):
                up = []
                for gw in p.gateways:
                    ok = healthy(health, source, gw.node)
                    self._observe(source, gw.node, ok, now)
                    if ok:
                        up.append(gw)
                key = (p.key, source)
                old = self.active.get(key)
                pick = self._pick(source, up, old.gateway if old else None, now)
                if old is not None and old.gateway == pick:
                    fresh[key] = old
                    continue
                if old is not None and old.gateway is not None:
                    self.failovers[key] = self.failovers.get(key, 0) + 1
                fresh[key] = ActiveGateway(p.key, source, pick, now)
        self.active = fresh
        return fresh

    def _pick(self, source: NodeKey | None, up: list[GatewayCandidate],
              current: GatewayCandidate | None, now: float) -> GatewayCandidate | None:
        if not up:
            return None
        if current is not None and current in up:
            # Keep it unless a more preferred gateway has been healthy for the hold-down.
            for gw in up:
                if gw == current:
                    return current
                if self._settled(source, gw.node, now):
                    return gw
        settled = [gw for gw in up if self._settled(source, gw.node, now)]
        return settled[0] if settled else up[0]

    def next_deadline(self) -> float | None:
        """When a gateway in hold-down is due to be settled (choose again then)."""
        due = [t + self.hold_down for t in self._recovered.values()
               if self.clock.now() - t < self.hold_down]
        return min(due) if due else None

    def forget(self, keep: Iterable[SourceGateway]) -> None:
        """Drop the history of (source, gateway) pairs no policy names any more."""
        kept = set(keep)
        for d in (self._was_healthy, self._recovered):
            for k in [k for k in d if k not in kept]:
                del d[k]

"""The agent config section `egress`."""

from __future__ import annotations

from pydantic import Field

from plexus.core.config import Strict


class EgressConfig(Strict):
    """How this node follows EgressGatewayPolicies; the policies themselves are manifests."""

    enabled: bool = Field(True, description="Derive egress gateway state on this node.")
    hold_down: float = Field(
        10.0, ge=0.0, description="Seconds a recovered gateway must stay healthy before it "
                                  "takes over again from a less preferred one (no flapping).")

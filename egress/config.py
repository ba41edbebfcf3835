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
    datapath: bool = Field(
        True, description="Steer selected pods' traffic to the active gateway through the "
                          "node's tunnel device and translate it on gateways (needs the bpf module).")
    tunnel_device: str = Field(
        "plxeg0", min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The VXLAN device traffic to a gateway node goes through (unique per node "
                    "namespace).")
    uplink: str | None = Field(
        None, description="The interface traffic leaves a gateway by, where its NAT runs; "
                          "default: the one holding the node's IP.")
    probe: bool = Field(
        True, description="Probe the gateways of the policies that select a pod on this node "
                          "(ICMP echo to the gateway node) and fail over on what is found.")
    probe_interval: float = Field(0.1, gt=0.0, le=60.0,
                                  description="Seconds between two probes of one gateway.")
    probe_threshold: int = Field(
        3, ge=1, le=100, description="Probes in a row without an answer that make a gateway "
                                     "unhealthy (detection within interval x (threshold + 1)).")
    nat_sweep_interval: float = Field(
        10.0, gt=0.0, le=3600.0,
        description="Seconds between two sweeps of a gateway's translations whose lifetime ran "
                    "out (TCP 6 h idle, 10 s after a FIN or RST, 60 s otherwise; the datapath "
                    "already ignores them and reuses their ports).")

"""PlexusNetworkPolicy: Kubernetes-shaped, shared across the mesh, applied with `plexus apply`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, IPvAnyNetwork

from plexus.core.config import Strict
from plexus.core.manifests import Metadata
from plexus.core.selectors import LabelSelector


class PortProtocol(Strict):
    port: int = Field(0, ge=0, le=65535, description="0: any port")
    protocol: Literal["TCP", "UDP", "ANY"] = "ANY"


class PortRule(Strict):
    ports: list[PortProtocol] = Field(min_length=1)


class IngressRule(Strict):
    from_endpoints: list[LabelSelector] = Field(default_factory=list)
    from_cidr: list[IPvAnyNetwork] = Field(default_factory=list, alias="fromCIDR")
    to_ports: list[PortRule] = Field(default_factory=list)


class EgressRule(Strict):
    to_endpoints: list[LabelSelector] = Field(default_factory=list)
    to_cidr: list[IPvAnyNetwork] = Field(default_factory=list, alias="toCIDR")
    to_ports: list[PortRule] = Field(default_factory=list)


class PolicySpec(Strict):
    endpoint_selector: LabelSelector
    ingress: list[IngressRule] = Field(default_factory=list)
    egress: list[EgressRule] = Field(default_factory=list)
    ingress_deny: list[IngressRule] = Field(default_factory=list)
    egress_deny: list[EgressRule] = Field(default_factory=list)


class PlexusNetworkPolicy(Strict):
    api_version: Literal["plexus.io/v1"]
    kind: Literal["PlexusNetworkPolicy"]
    metadata: Metadata
    spec: PolicySpec


MANIFEST_KINDS: dict[str, type[Strict]] = {"PlexusNetworkPolicy": PlexusNetworkPolicy}

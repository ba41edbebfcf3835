"""PlexusNetworkPolicy: Kubernetes-shaped, shared across the mesh, applied with `plexus apply`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, IPvAnyNetwork, model_validator

from plexus.core.config import Strict

NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class Expression(Strict):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values(self) -> Expression:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class Selector(Strict):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[Expression] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for e in self.match_expressions:
            present = e.key in labels
            if e.operator == "Exists" and not present:
                return False
            if e.operator == "DoesNotExist" and present:
                return False
            if e.operator == "In" and labels.get(e.key) not in e.values:
                return False
            if e.operator == "NotIn" and present and labels[e.key] in e.values:
                return False
        return True

    def mentions(self, key: str) -> bool:
        return key in self.match_labels or any(e.key == key for e in self.match_expressions)


class PortProtocol(Strict):
    port: int = Field(0, ge=0, le=65535, description="0: any port")
    protocol: Literal["TCP", "UDP", "ANY"] = "ANY"


class PortRule(Strict):
    ports: list[PortProtocol] = Field(min_length=1)


class IngressRule(Strict):
    from_endpoints: list[Selector] = Field(default_factory=list)
    from_cidr: list[IPvAnyNetwork] = Field(default_factory=list, alias="fromCIDR")
    to_ports: list[PortRule] = Field(default_factory=list)


class EgressRule(Strict):
    to_endpoints: list[Selector] = Field(default_factory=list)
    to_cidr: list[IPvAnyNetwork] = Field(default_factory=list, alias="toCIDR")
    to_ports: list[PortRule] = Field(default_factory=list)


class Metadata(Strict):
    name: str = Field(pattern=NAME)
    namespace: str = Field("default", pattern=NAME)
    labels: dict[str, str] = Field(default_factory=dict)


class PolicySpec(Strict):
    endpoint_selector: Selector
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

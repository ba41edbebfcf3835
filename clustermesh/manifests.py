"""User manifests ClusterMesh owns: the Kubernetes-shaped Service with Cilium's annotations."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from plexus.core.config import Strict
from plexus.core.manifests import Metadata

MANIFESTS_PREFIX = "plexus/manifests/v1"
MANIFESTS_CACHE_PREFIX = "plexus/cache/manifests/v1"  # KVStoreMesh's copy, per remote cluster
ANNOTATION_GLOBAL = "service.cilium.io/global"
ANNOTATION_SHARED = "service.cilium.io/shared"
ANNOTATION_AFFINITY = "service.cilium.io/affinity"


def manifest_key(cluster: str, kind: str, namespace: str, name: str) -> str:
    return f"{MANIFESTS_PREFIX}/{cluster}/{kind}/{namespace}/{name}"


class ServicePort(Strict):
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    port: int = Field(ge=1, le=65535)
    target_port: int | None = Field(None, ge=1, le=65535)


class ExplicitBackend(Strict):
    """A backend given by address, for workloads no endpoint registration covers."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address


class ServiceSpec(Strict):
    cluster_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = Field(None, alias="clusterIP")
    type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = "ClusterIP"
    selector: dict[str, str] = Field(default_factory=dict)
    ports: list[ServicePort] = Field(min_length=1)
    external_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = Field(
        default_factory=list, alias="externalIPs")
    load_balancer_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = Field(
        None, alias="loadBalancerIP")
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    backends: list[ExplicitBackend] = Field(default_factory=list)

    @model_validator(mode="after")
    def _port_names(self) -> ServiceSpec:
        # Kubernetes' rule, and what the shared record relies on: ports are keyed by name
        # there, so two ports without a name, or with the same one, would be one port.
        names = [p.name for p in self.ports]
        if len(names) > 1 and "" in names:
            raise ValueError("ports: with more than one port, every port needs a name")
        if len(set(names)) != len(names):
            raise ValueError("ports: port names must be unique")
        return self


class Service(Strict):
    api_version: Literal["v1"]
    kind: Literal["Service"]
    metadata: Metadata
    spec: ServiceSpec

    @field_validator("metadata")
    @classmethod
    def _annotations(cls, m: Metadata) -> Metadata:
        for key in (ANNOTATION_GLOBAL, ANNOTATION_SHARED):
            if key in m.annotations and m.annotations[key] not in ("true", "false"):
                raise ValueError(f"annotation {key} must be \"true\" or \"false\"")
        aff = m.annotations.get(ANNOTATION_AFFINITY, "none")
        if aff not in ("local", "remote", "none"):
            raise ValueError(f"annotation {ANNOTATION_AFFINITY} must be local, remote or none")
        return m

    @property
    def is_global(self) -> bool:
        return self.metadata.annotations.get(ANNOTATION_GLOBAL) == "true"

    @property
    def is_shared(self) -> bool:
        return self.metadata.annotations.get(ANNOTATION_SHARED, "true") == "true"

    @property
    def affinity(self) -> str:
        return self.metadata.annotations.get(ANNOTATION_AFFINITY, "none")


MANIFEST_KINDS: dict[str, type[Strict]] = {"Service": Service}

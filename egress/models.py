"""EgressGatewayPolicy: which pods leave through which gateway nodes with which address.

Modelled on Cilium's CiliumEgressGatewayPolicy (cilium.io/v2), with an ordered list of
gateways (failover) and selectors that reach pods of every cluster of the mesh: the label
`io.cilium.k8s.policy.cluster` in a podSelector narrows a selector to one cluster.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from plexus.core.config import Strict
from plexus.core.manifests import Metadata
from plexus.core.selectors import LabelSelector

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # Linux IFNAMSIZ - 1, no '/' or blanks


def unholdable(ip: IPAddress) -> str | None:
    """Why no gateway could send from `ip`, or None when one can."""
    for flag, why in (("is_unspecified", "unspecified"), ("is_loopback", "a loopback address"),
                      ("is_multicast", "a multicast address"),
                      ("is_link_local", "a link-local address"), ("is_reserved", "a reserved address")):
        if getattr(ip, flag):
            return why
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    return None


def _holdable(ip: IPAddress) -> IPAddress:
    if why := unholdable(ip):
        raise ValueError(f"{ip} is {why}: no gateway can send from it")
    return ip


EgressIP = Annotated[IPAddress, AfterValidator(_holdable)]


class EgressSelector(Strict):
    """Pods this policy applies to: both selectors must match (an absent one matches all)."""

    pod_selector: LabelSelector | None = Field(
        None, description="Pod labels; io.cilium.k8s.policy.cluster narrows to a cluster.")
    namespace_selector: LabelSelector | None = Field(
        None, description="Labels of the pod's namespace (kubernetes.io/metadata.name is its name).")

    @model_validator(mode="after")
    def _selects_something(self) -> EgressSelector:
        if self.pod_selector is None and self.namespace_selector is None:
            raise ValueError("give a podSelector or a namespaceSelector (or both)")
        return self


class EgressGateway(Strict):
    """Nodes that may be the gateway, in the order of the policy's list; at most one of
    `egressIP` or `interface` (the gateway's own address then, which changes on failover)."""

    node_selector: LabelSelector = Field(
        description="Node labels; kubernetes.io/hostname and io.cilium.k8s.policy.cluster are "
                    "always set from the node's name and cluster.")
    egress_ip: EgressIP | None = Field(None, alias="egressIP",
                                        description="An address of the gateway node itself.")
    interface: str | None = Field(None, description="The gateway's interface whose first "
                                                    "address the traffic leaves with.")

    @model_validator(mode="after")
    def _one_source(self) -> EgressGateway:
        if self.egress_ip is not None and self.interface is not None:
            raise ValueError("give egressIP or interface, not both")
        if self.interface is not None and (not _IFNAME.match(self.interface)
                                           or self.interface in (".", "..")):
            raise ValueError(f"interface {self.interface!r} is not a Linux interface name "
                             "(1-15 characters, no '/' or blanks)")
        return self


class EgressGatewayPolicySpec(Strict):
    selectors: list[EgressSelector] = Field(min_length=1)
    destination_cidrs: list[IPNetwork] = Field(min_length=1, alias="destinationCIDRs")
    excluded_cidrs: list[IPNetwork] = Field(default_factory=list, alias="excludedCIDRs")
    egress_ip: EgressIP | None = Field(
        None, alias="egressIP", description="What the outside sees; held by the active gateway.")
    egress_gateways: list[EgressGateway] = Field(min_length=1, description="In preference order.")

    @model_validator(mode="after")
    def _addresses_fit(self) -> EgressGatewayPolicySpec:
        # Errors are phrased with their path below `spec`: each names the field to fix.
        problems: list[str] = []
        # IPv4 only: an IPv6 CIDR accepted would be a promise the datapath does not keep
        # (the pods' IPv6 traffic would leave with their own addresses)
        for name, nets in (("destinationCIDRs", self.destination_cidrs),
                           ("excludedCIDRs", self.excluded_cidrs)):
            problems.extend(f"{name}[{j}]: {net} is IPv6; the egress gateway steers IPv4 only"
                            for j, net in enumerate(nets) if net.version == 6)
        if problems:
            raise ValueError("; ".join(problems))
        if self.egress_ip is not None:
            for i, gw in enumerate(self.egress_gateways):
                if gw.egress_ip is not None or gw.interface is not None:
                    field = "egressIP" if gw.egress_ip is not None else "interface"
                    problems.append(
                        f"egressGateways[{i}].{field}: the policy's egressIP {self.egress_ip} is "
                        "held by whichever gateway is active; a gateway names its own address "
                        "only when spec.egressIP is not set")
        for where, ip in self._egress_ips():
            for j, net in enumerate(self.destination_cidrs):
                if net.version != ip.version:
                    problems.append(f"{where}: IPv{ip.version} address {ip} cannot be the source "
                                    f"of traffic to destinationCIDRs[{j}] {net} (IPv{net.version})")
                elif ip in net and not any(ip in x for x in self.excluded_cidrs):
                    problems.append(f"{where}: {ip} lies inside destinationCIDRs[{j}] {net}: "
                                    "traffic from it would be steered back to the gateway")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _egress_ips(self) -> list[tuple[str, IPAddress]]:
        out: list[tuple[str, IPAddress]] = []
        if self.egress_ip is not None:
            out.append(("egressIP", self.egress_ip))
        out.extend((f"egressGateways[{i}].egressIP", gw.egress_ip)
                   for i, gw in enumerate(self.egress_gateways) if gw.egress_ip is not None)
        return out


class EgressGatewayPolicy(Strict):
    api_version: Literal["plexus.io/v1"]
    kind: Literal["EgressGatewayPolicy"]
    metadata: Metadata
    spec: EgressGatewayPolicySpec


MANIFEST_KINDS: dict[str, type[Strict]] = {"EgressGatewayPolicy": EgressGatewayPolicy}

"""The policy engine, pure: policies, identities and endpoints in, map entries out.

Semantics (as Cilium): an endpoint no policy selects allows everything; once a policy with
rules in a direction selects it, that direction is default-deny; a deny beats an allow; the
host is always allowed. A selector that does not name a namespace matches only the
policy's own namespace; the cluster label `io.cilium.k8s.policy.cluster` names a cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from bpf.models import EgressRule, IngressRule, PlexusNetworkPolicy
from clustermesh.models import ID_HOST, LABEL_NAMESPACE
from plexus.core.selectors import LabelSelector

EGRESS, INGRESS = 0, 1
ALLOW, DENY = 1, 2
PROTOCOLS = {"ANY": 0, "TCP": 6, "UDP": 17}
CIDR_IDENTITY_BASE = 1 << 24  # node-local identities for CIDRs, as Cilium's local scope


@dataclass(frozen=True)
class LocalEndpoint:
    ifname: str
    ip: str
    labels: dict[str, str]  # without source prefix, including namespace and cluster


@dataclass(frozen=True)
class PolicyEntry:
    ifname: str
    identity: int
    port: int
    proto: int
    direction: int
    action: int

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.ifname, self.identity, self.port, self.proto, self.direction)


@dataclass(frozen=True)
class Enforced:
    ifname: str
    direction: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.ifname, self.direction)


def cidr_identities(policies: Iterable[PlexusNetworkPolicy]) -> dict[str, int]:
    """A node-local identity for every CIDR any policy names, numbered in sorted order."""
    cidrs: set[str] = set()
    for p in policies:
        for r in [*p.spec.ingress, *p.spec.ingress_deny]:
            cidrs.update(str(c) for c in r.from_cidr)
        for e in [*p.spec.egress, *p.spec.egress_deny]:
            cidrs.update(str(c) for c in e.to_cidr)
    return {c: CIDR_IDENTITY_BASE + i for i, c in enumerate(sorted(cidrs))}


def in_namespace(sel: LabelSelector, namespace: str, labels: dict[str, str]) -> bool:
    """Whether a peer selector of a policy in `namespace` matches an identity's labels."""
    if not sel.mentions(LABEL_NAMESPACE) and labels.get(LABEL_NAMESPACE) != namespace:
        return False
    return sel.matches(labels)


def _peers(selectors: list[LabelSelector], cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
           namespace: str, identities: dict[int, dict[str, str]], cidr_ids: dict[str, int]) -> set[int]:
    out = {i for i, labels in identities.items()
           if any(in_namespace(s, namespace, labels) for s in selectors)}
    out.update(cidr_ids[str(c)] for c in cidrs)
    return out


def rule_ports(rule: IngressRule | EgressRule) -> list[tuple[int, int]]:
    if not rule.to_ports:
        return [(0, 0)]
    return [(p.port, PROTOCOLS[p.protocol]) for pr in rule.to_ports for p in pr.ports]


def compute(policies: Iterable[PlexusNetworkPolicy], identities: dict[int, dict[str, str]],
            endpoints: Iterable[LocalEndpoint], cidr_ids: dict[str, int] | None = None,
            always_allowed: tuple[int, ...] = (ID_HOST,),
            ) -> tuple[list[PolicyEntry], list[Enforced]]:
    """Every entry from scratch. `cidr_ids` gives the CIDRs' identities (default: numbered in
    sorted order, as `cidr_identities`); the incremental resolver keeps its own, stable."""
    policies = list(policies)
    if cidr_ids is None:
        cidr_ids = cidr_identities(policies)
    entries: dict[tuple[str, int, int, int, int], PolicyEntry] = {}
    enforced: set[Enforced] = set()

    def add(e: PolicyEntry) -> None:
        old = entries.get(e.key)
        if old is None or (old.action == ALLOW and e.action == DENY):  # deny beats allow
            entries[e.key] = e

    for ep in endpoints:
        for p in policies:
            ns = p.metadata.namespace
            if ep.labels.get(LABEL_NAMESPACE) != ns or not p.spec.endpoint_selector.matches(ep.labels):
                continue
            sections: list[tuple[int, int, list[IngressRule] | list[EgressRule]]] = [
                (INGRESS, ALLOW, p.spec.ingress), (INGRESS, DENY, p.spec.ingress_deny),
                (EGRESS, ALLOW, p.spec.egress), (EGRESS, DENY, p.spec.egress_deny)]
            for direction, action, rules in sections:
                if not rules:
                    continue
                enforced.add(Enforced(ep.ifname, direction))
                for rule in rules:
                    if isinstance(rule, IngressRule):
                        peers = _peers(rule.from_endpoints, rule.from_cidr, ns, identities, cidr_ids)
                    else:
                        peers = _peers(rule.to_endpoints, rule.to_cidr, ns, identities, cidr_ids)
                    for ident in peers:
                        for port, proto in rule_ports(rule):
                            add(PolicyEntry(ep.ifname, ident, port, proto, direction, action))
    for e in enforced:  # the node itself always reaches its pods (health checks, probes)
        for ident in always_allowed:
            add(PolicyEntry(e.ifname, ident, 0, 0, e.direction, ALLOW))
    return sorted(entries.values(), key=lambda e: e.key), sorted(enforced, key=lambda e: e.key)

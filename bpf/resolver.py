"""Selector -> identity resolution, incremental: `compute()`'s result, kept up to date.

`bpf.policy.compute` derives every policy entry from scratch. The resolver holds the same
inputs (policies, identities of every cluster, local endpoints) and, for each change to one
of them, adjusts only the entries that change, handing them out as deltas:

- every distinct peer selector (with the namespace of its policy) is cached with the set of
  identities it matches, and shared by every rule that uses it;
- a rule's peers are the union of its selectors' identities and its CIDRs' identities,
  counted, so an identity enters or leaves a rule exactly when its first selector starts or
  its last one stops matching;
- every map entry key counts the rules that allow it and that deny it: it exists while any
  does, and a deny wins while one counts (deny beats allow);
- every (interface, direction) counts the policies that enforce it; the host's allow entry
  lives while one does.

An identity that appears or vanishes is tested against each cached selector once, and only
the rules it enters or leaves touch entries, for only the endpoints their policies select.
A policy or endpoint change touches only that policy's or endpoint's entries.

CIDR identities are allocated stably (lowest free number, kept while any rule names the
CIDR), so editing one policy never renumbers another policy's CIDRs; `reset` numbers them
in sorted order, as `cidr_identities` does.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from bpf.models import EgressRule, IngressRule, PlexusNetworkPolicy
from bpf.policy import (
    ALLOW,
    CIDR_IDENTITY_BASE,
    DENY,
    EGRESS,
    INGRESS,
    Enforced,
    LocalEndpoint,
    PolicyEntry,
    in_namespace,
    rule_ports,
)
from clustermesh.models import ID_HOST, LABEL_NAMESPACE
from plexus.core.selectors import LabelSelector

EntryKey = tuple[str, int, int, int, int]   # (ifname, identity, port, proto, direction)
EnforceKey = tuple[str, int]                # (ifname, direction)
SelectorKey = tuple[str, str]               # (namespace, canonical selector)


class CidrIdentities:
    """Node-local identities for CIDRs: the lowest free number, held while referenced."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        self._free: list[int] = []
        self._next = CIDR_IDENTITY_BASE

    def acquire(self, cidr: str) -> int:
        if cidr not in self.ids:
            if self._free:
                self.ids[cidr] = heapq.heappop(self._free)
            else:
                self.ids[cidr] = self._next
                self._next += 1
        self._refs[cidr] = self._refs.get(cidr, 0) + 1
        return self.ids[cidr]

    def release(self, cidr: str) -> None:
        self._refs[cidr] -= 1
        if not self._refs[cidr]:
            del self._refs[cidr]
            heapq.heappush(self._free, self.ids.pop(cidr))


class _Selector:
    __slots__ = ("ids", "namespace", "selector", "users")

    def __init__(self, selector: LabelSelector, namespace: str) -> None:
        self.selector = selector
        self.namespace = namespace
        self.ids: set[int] = set()
        self.users: list[_Rule] = []  # once per occurrence in a rule

    def matches(self, labels: dict[str, str]) -> bool:
        return in_namespace(self.selector, self.namespace, labels)


@dataclass(eq=False)
class _Rule:
    policy: _Policy
    direction: int
    action: int
    ports: list[tuple[int, int]]
    selectors: list[SelectorKey] = field(default_factory=list)
    cidrs: list[str] = field(default_factory=list)
    peers: dict[int, int] = field(default_factory=dict)  # identity -> selectors/CIDRs matching


@dataclass(eq=False)
class _Policy:
    name: str
    model: PlexusNetworkPolicy
    rules: list[_Rule] = field(default_factory=list)
    directions: set[int] = field(default_factory=set)  # enforced where it has rules
    endpoints: set[str] = field(default_factory=set)   # keys of the endpoints it selects

    def selects(self, ep: LocalEndpoint) -> bool:
        ns = self.model.metadata.namespace
        return (ep.labels.get(LABEL_NAMESPACE) == ns
                and self.model.spec.endpoint_selector.matches(ep.labels))


def _canonical(sel: LabelSelector) -> str:
    return json.dumps(sel.model_dump(), sort_keys=True)


class Resolver:
    def __init__(self, always_allowed: tuple[int, ...] = (ID_HOST,)) -> None:
        # identities every enforced endpoint admits: the node itself (health checks, probes);
        # on an enrolled host also the mesh's nodes (WireGuard and BGP reach it from them)
        self.always_allowed = always_allowed
        self._clear()

    def _clear(self) -> None:
        self.identities: dict[int, dict[str, str]] = {}
        self.endpoints: dict[str, LocalEndpoint] = {}
        self.policies: dict[str, _Policy] = {}
        self.selectors: dict[SelectorKey, _Selector] = {}
        self.cidrs = CidrIdentities()
        self._counts: dict[EntryKey, list[int]] = {}  # [allowing rules, denying rules]
        self._enforce: dict[EnforceKey, int] = {}
        self._dirty: set[EntryKey] = set()
        self._dirty_enforce: set[EnforceKey] = set()

    # ---- inputs ---------------------------------------------------------------------
    def reset(self, policies: dict[str, PlexusNetworkPolicy], identities: dict[int, dict[str, str]],
              endpoints: dict[str, LocalEndpoint]) -> None:
        """Start over from complete inputs; `entries()` and `enforced()` give the result."""
        self._clear()
        every = sorted({c for p in policies.values() for c in _cidrs(p)})
        for c in every:  # number the CIDRs in sorted order, as cidr_identities does
            self.cidrs.acquire(c)
        self.identities = dict(identities)
        self.endpoints = dict(endpoints)
        for name, p in policies.items():
            self.set_policy(name, p)
        for c in every:
            self.cidrs.release(c)
        self._dirty.clear()
        self._dirty_enforce.clear()

    def set_identity(self, ident: int, labels: dict[str, str] | None) -> None:
        """An identity appeared, changed its labels, or vanished (None)."""
        old = self.identities.get(ident)
        if old == labels:
            return
        if old is not None:
            del self.identities[ident]
            for sel in self.selectors.values():
                if ident in sel.ids:
                    sel.ids.discard(ident)
                    for rule in sel.users:
                        self._peer(rule, ident, -1)
        if labels is not None:
            self.identities[ident] = labels
            for sel in self.selectors.values():
                if sel.matches(labels):
                    sel.ids.add(ident)
                    for rule in sel.users:
                        self._peer(rule, ident, +1)

    def set_policy(self, name: str, model: PlexusNetworkPolicy | None) -> None:
        """A policy appeared, changed, or vanished (None)."""
        old = self.policies.get(name)
        if old is not None and model is not None and old.model == model:
            return
        new = self._build(name, model) if model is not None else None  # CIDRs held before
        if old is not None:                                             # the old ones go
            del self.policies[name]
            for key in old.endpoints:
                self._attach(old, self.endpoints[key].ifname, -1)
            for rule in old.rules:
                for skey in rule.selectors:
                    sel = self.selectors[skey]
                    sel.users.remove(rule)
                    if not sel.users:
                        del self.selectors[skey]
                for c in rule.cidrs:
                    self.cidrs.release(c)
        if new is not None:
            self.policies[name] = new
            for key, ep in self.endpoints.items():
                if new.selects(ep):
                    new.endpoints.add(key)
                    self._attach(new, ep.ifname, +1)

    def set_endpoint(self, key: str, ep: LocalEndpoint | None) -> None:
        """A local endpoint appeared, changed, or vanished (None)."""
        old = self.endpoints.get(key)
        if old == ep:
            return
        if old is not None:
            del self.endpoints[key]
            for pol in self.policies.values():
                if key in pol.endpoints:
                    pol.endpoints.discard(key)
                    self._attach(pol, old.ifname, -1)
        if ep is not None:
            self.endpoints[key] = ep
            for pol in self.policies.values():
                if pol.selects(ep):
                    pol.endpoints.add(key)
                    self._attach(pol, ep.ifname, +1)

    # ---- outputs --------------------------------------------------------------------
    def _entry(self, key: EntryKey) -> PolicyEntry | None:
        c = self._counts.get(key)
        if c is None:
            return None
        return PolicyEntry(*key, action=DENY if c[1] else ALLOW)

    def drain(self) -> tuple[list[tuple[EntryKey, PolicyEntry | None]],
                             list[tuple[EnforceKey, Enforced | None]]]:
        """What changed since the last drain: (key, row) pairs, row None for a removed one."""
        entries = [(k, self._entry(k)) for k in self._dirty]
        enforced = [(k, Enforced(*k) if k in self._enforce else None) for k in self._dirty_enforce]
        self._dirty.clear()
        self._dirty_enforce.clear()
        return entries, enforced

    def entries(self) -> list[PolicyEntry]:
        out = [self._entry(k) for k in self._counts]
        return sorted((e for e in out if e is not None), key=lambda e: e.key)

    def enforced(self) -> list[Enforced]:
        return sorted((Enforced(*k) for k in self._enforce), key=lambda e: e.key)

    # ---- internals ------------------------------------------------------------------
    def _build(self, name: str, model: PlexusNetworkPolicy) -> _Policy:
        pol = _Policy(name, model)
        ns = model.metadata.namespace
        spec = model.spec
        sections: list[tuple[int, int, list[IngressRule] | list[EgressRule]]] = [
            (INGRESS, ALLOW, spec.ingress), (INGRESS, DENY, spec.ingress_deny),
            (EGRESS, ALLOW, spec.egress), (EGRESS, DENY, spec.egress_deny)]
        for direction, action, rules in sections:
            if rules:
                pol.directions.add(direction)
            for r in rules:
                rule = _Rule(pol, direction, action, rule_ports(r))
                if isinstance(r, IngressRule):
                    selectors, cidrs = r.from_endpoints, r.from_cidr
                else:
                    selectors, cidrs = r.to_endpoints, r.to_cidr
                for s in selectors:
                    skey = (ns, _canonical(s))
                    sel = self.selectors.get(skey)
                    if sel is None:
                        sel = self.selectors[skey] = _Selector(s, ns)
                        sel.ids = {i for i, labels in self.identities.items() if sel.matches(labels)}
                    sel.users.append(rule)
                    rule.selectors.append(skey)
                    for i in sel.ids:
                        rule.peers[i] = rule.peers.get(i, 0) + 1
                for c in cidrs:
                    cid = self.cidrs.acquire(str(c))
                    rule.cidrs.append(str(c))
                    rule.peers[cid] = rule.peers.get(cid, 0) + 1
                pol.rules.append(rule)
        return pol

    def _attach(self, pol: _Policy, ifname: str, sign: int) -> None:
        """A policy starts (+1) or stops (-1) selecting an endpoint."""
        for direction in pol.directions:
            self._enforced(ifname, direction, sign)
        for rule in pol.rules:
            for ident in rule.peers:
                self._contribute(ifname, ident, rule, sign)

    def _peer(self, rule: _Rule, ident: int, sign: int) -> None:
        n = rule.peers.get(ident, 0) + sign
        if n:
            rule.peers[ident] = n
        else:
            del rule.peers[ident]
        if (sign > 0 and n == 1) or (sign < 0 and n == 0):  # entered or left the rule
            for key in rule.policy.endpoints:
                self._contribute(self.endpoints[key].ifname, ident, rule, sign)

    def _contribute(self, ifname: str, ident: int, rule: _Rule, sign: int) -> None:
        slot = 1 if rule.action == DENY else 0
        for port, proto in rule.ports:
            self._count((ifname, ident, port, proto, rule.direction), slot, sign)

    def _count(self, key: EntryKey, slot: int, sign: int) -> None:
        c = self._counts.get(key)
        if c is None:
            c = self._counts[key] = [0, 0]
        c[slot] += sign
        if not c[0] and not c[1]:
            del self._counts[key]
        self._dirty.add(key)

    def _enforced(self, ifname: str, direction: int, sign: int) -> None:
        key = (ifname, direction)
        n = self._enforce.get(key, 0) + sign
        if n:
            self._enforce[key] = n
        else:
            del self._enforce[key]
        if (sign > 0 and n == 1) or (sign < 0 and n == 0):
            for ident in self.always_allowed:
                self._count((ifname, ident, 0, 0, direction), 0, sign)
            self._dirty_enforce.add(key)


def _cidrs(p: PlexusNetworkPolicy) -> Iterable[str]:
    for i in [*p.spec.ingress, *p.spec.ingress_deny]:
        yield from (str(c) for c in i.from_cidr)
    for e in [*p.spec.egress, *p.spec.egress_deny]:
        yield from (str(c) for c in e.to_cidr)

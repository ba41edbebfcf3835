"""The incremental resolver always equals the full computation, and touches only what changes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bpf.models import PlexusNetworkPolicy
from bpf.policy import ALLOW, DENY, INGRESS, LocalEndpoint, cidr_identities, compute
from bpf.resolver import Resolver
from plexus.core.config import parse

NS, CLUSTER = "io.kubernetes.pod.namespace", "io.cilium.k8s.policy.cluster"
CIDRS = ["10.0.0.0/8", "198.51.100.0/24", "fd00:db8::/64", "2001:db8::/32", "192.0.2.1/32"]


def make_policy(name: str, ns: str, spec: dict[str, Any]) -> PlexusNetworkPolicy:
    return parse(PlexusNetworkPolicy, {"apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
                                       "metadata": {"name": name, "namespace": ns}, "spec": spec}, name)


def random_labels(rng: random.Random) -> dict[str, str]:
    labels = {NS: rng.choice(["default", "other"]), CLUSTER: rng.choice(["east", "west"])}
    for key, values in (("app", "abcd"), ("zone", "xy"), ("tier", "fb")):
        if rng.random() < 0.8:
            labels[key] = rng.choice(values)
    return labels


def random_selector(rng: random.Random) -> dict[str, Any]:
    sel: dict[str, Any] = {}
    if rng.random() < 0.7:
        sel["matchLabels"] = {k: rng.choice(v) for k, v in (("app", "abcd"), ("zone", "xy"))
                              if rng.random() < 0.6}
        if rng.random() < 0.3:
            sel["matchLabels"][CLUSTER] = rng.choice(["east", "west"])
        if rng.random() < 0.15:
            sel["matchLabels"][NS] = rng.choice(["default", "other"])
    if rng.random() < 0.4:
        op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
        expr: dict[str, Any] = {"key": rng.choice(["app", "tier", CLUSTER]), "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = rng.sample(["a", "b", "c", "f", "east", "west"], 2)
        sel["matchExpressions"] = [expr]
    return sel


def random_rule(rng: random.Random, peer: str, cidr: str, shared: list[dict[str, Any]]) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    n = rng.choice([0, 1, 1, 2, 3])
    if n:
        # selectors are often shared between rules and policies, sometimes repeated in one
        rule[peer] = [rng.choice(shared) if rng.random() < 0.6 else random_selector(rng)
                      for _ in range(n)]
    if rng.random() < 0.3 or not n:
        rule[cidr] = rng.sample(CIDRS, rng.randint(1, 2))
    if rng.random() < 0.6:
        rule["toPorts"] = [{"ports": [{"port": rng.choice([0, 53, 80, 443]),
                                       "protocol": rng.choice(["TCP", "UDP", "ANY"])}
                                      for _ in range(rng.randint(1, 2))]}]
    return rule


def random_policy(rng: random.Random, name: str, shared: list[dict[str, Any]]) -> PlexusNetworkPolicy:
    spec: dict[str, Any] = {"endpointSelector": random_selector(rng) if rng.random() < 0.7 else {}}
    for section, peer, cidr in (("ingress", "fromEndpoints", "fromCIDR"),
                                ("ingressDeny", "fromEndpoints", "fromCIDR"),
                                ("egress", "toEndpoints", "toCIDR"),
                                ("egressDeny", "toEndpoints", "toCIDR")):
        if rng.random() < (0.6 if "Deny" not in section else 0.25):
            spec[section] = [random_rule(rng, peer, cidr, shared) for _ in range(rng.randint(1, 3))]
    return make_policy(name, rng.choice(["default", "default", "other"]), spec)


def full(res: Resolver, policies: dict[str, PlexusNetworkPolicy], identities: dict[int, dict[str, str]],
         endpoints: dict[str, LocalEndpoint]) -> tuple[list[Any], list[Any]]:
    return compute(policies.values(), identities, endpoints.values(), cidr_ids=res.cidrs.ids)


@pytest.mark.parametrize("seed", range(12))
def test_random_changes_incremental_equals_full(seed: int) -> None:
    rng = random.Random(seed)
    shared = [random_selector(rng) for _ in range(6)]
    identities = {256 + i: random_labels(rng) for i in range(rng.randint(0, 40))}
    endpoints = {f"c{i}": LocalEndpoint(f"plx{i}", f"10.1.1.{i}", random_labels(rng)) for i in range(4)}
    policies = {f"p{i}": random_policy(rng, f"p{i}", shared) for i in range(rng.randint(0, 4))}
    res = Resolver()
    res.reset(policies, identities, endpoints)
    assert res.cidrs.ids == cidr_identities(policies.values())  # a fresh start numbers as before
    table = {e.key: e for e in res.entries()}   # what the module's tables hold
    enforced = {e.key: e for e in res.enforced()}
    assert (res.entries(), res.enforced()) == full(res, policies, identities, endpoints)

    for _step in range(250):
        op = rng.random()
        if op < 0.45:    # an identity appears, vanishes or changes its labels, in any cluster
            ident = rng.choice([*identities, 256 + rng.randint(0, 80)]) if identities else 300
            if ident in identities and rng.random() < 0.6:
                del identities[ident]
                res.set_identity(ident, None)
            else:
                identities[ident] = random_labels(rng)
                res.set_identity(ident, identities[ident])
        elif op < 0.8:   # a policy is added, changed or deleted
            name = f"p{rng.randint(0, 5)}"
            if name in policies and rng.random() < 0.4:
                del policies[name]
                res.set_policy(name, None)
            else:
                policies[name] = random_policy(rng, name, shared)
                res.set_policy(name, policies[name])
        else:            # a local endpoint comes, goes or is relabelled
            key = f"c{rng.randint(0, 5)}"
            if key in endpoints and rng.random() < 0.4:
                del endpoints[key]
                res.set_endpoint(key, None)
            else:
                endpoints[key] = LocalEndpoint(f"plx{key}", "10.1.1.9", random_labels(rng))
                res.set_endpoint(key, endpoints[key])
        entry_deltas, enforce_deltas = res.drain()
        for k, row in entry_deltas:
            if row is None:
                table.pop(k, None)
            else:
                table[k] = row
        for ek, erow in enforce_deltas:
            if erow is None:
                enforced.pop(ek, None)
            else:
                enforced[ek] = erow
        want_entries, want_enforced = full(res, policies, identities, endpoints)
        assert sorted(table.values(), key=lambda e: e.key) == want_entries
        assert sorted(enforced.values(), key=lambda e: e.key) == want_enforced
        assert (res.entries(), res.enforced()) == (want_entries, want_enforced)
    # every CIDR still named has an identity; none is held for a CIDR nobody names
    named = set(cidr_identities(policies.values()))
    assert set(res.cidrs.ids) == named


WEB = LocalEndpoint("plxweb", "10.1.1.5", {"app": "web", NS: "default", CLUSTER: "east"})
ALLOW_WEST = make_policy("allow", "default", {
    "endpointSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client", CLUSTER: "west"}}],
                 "toPorts": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}]})


def test_an_identity_change_touches_only_its_own_entries() -> None:
    res = Resolver()
    ids = {131072 + i: {"app": "client" if i % 2 else "db", NS: "default", CLUSTER: "west"}
           for i in range(1000)}
    res.reset({"allow": ALLOW_WEST}, ids, {"c1": WEB})
    assert len(res.entries()) == 501  # 500 clients and the host
    res.set_identity(140000, {"app": "db", NS: "default", CLUSTER: "west"})
    assert res.drain() == ([], [])    # matches no selector: nothing to do
    res.set_identity(140001, {"app": "client", NS: "default", CLUSTER: "west"})
    entries, enforced = res.drain()
    assert entries == [(("plxweb", 140001, 80, 6, INGRESS),
                        res._entry(("plxweb", 140001, 80, 6, INGRESS)))] and not enforced
    assert entries[0][1] is not None and entries[0][1].action == ALLOW
    res.set_identity(140001, None)
    assert res.drain() == ([(("plxweb", 140001, 80, 6, INGRESS), None)], [])


def test_deny_holds_while_any_deny_rule_counts() -> None:
    deny = make_policy("deny", "default", {
        "endpointSelector": {}, "ingressDeny": [{"fromEndpoints": [{"matchLabels": {CLUSTER: "west"}}]}]})
    res = Resolver()
    res.reset({"allow": ALLOW_WEST}, {131072: {"app": "client", NS: "default", CLUSTER: "west"}},
              {"c1": WEB})
    key = ("plxweb", 131072, 80, 6, INGRESS)
    res.set_policy("deny", deny)
    res.drain()
    allowed, denied = res._entry(key), res._entry(("plxweb", 131072, 0, 0, INGRESS))
    assert allowed is not None and allowed.action == ALLOW
    assert denied is not None and denied.action == DENY
    res.set_policy("deny", None)
    entries, _ = res.drain()
    assert (("plxweb", 131072, 0, 0, INGRESS), None) in entries


def test_cidr_identities_stay_put_when_another_policy_changes() -> None:
    a = make_policy("a", "default", {"endpointSelector": {}, "egress": [{"toCIDR": ["198.51.100.0/24"]}]})
    b = make_policy("b", "default", {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"]}]})
    res = Resolver()
    res.reset({"a": a}, {}, {"c1": WEB})
    before = dict(res.cidrs.ids)
    res.set_policy("b", b)  # sorts before a's CIDR, but a's keeps its number
    assert res.cidrs.ids["198.51.100.0/24"] == before["198.51.100.0/24"]
    res.set_policy("a", make_policy("a", "default", {"endpointSelector": {}, "egress": [
        {"toCIDR": ["198.51.100.0/24"], "toPorts": [{"ports": [{"port": 443}]}]}]}))
    assert res.cidrs.ids["198.51.100.0/24"] == before["198.51.100.0/24"]  # an edit keeps it too

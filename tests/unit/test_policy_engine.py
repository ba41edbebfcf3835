from __future__ import annotations

from typing import Any

import pytest

from bpf.models import PlexusNetworkPolicy
from bpf.policy import ALLOW, CIDR_IDENTITY_BASE, DENY, EGRESS, INGRESS, LocalEndpoint, compute
from clustermesh.models import ID_HOST
from plexus.core.config import ConfigError, parse

WEB = LocalEndpoint("plxweb", "10.1.1.5", {"app": "web", "io.kubernetes.pod.namespace": "default",
                                         "io.cilium.k8s.policy.cluster": "east"})
NS, CLUSTER = "io.kubernetes.pod.namespace", "io.cilium.k8s.policy.cluster"
IDS = {
    65600: {"app": "client", NS: "default", CLUSTER: "east"},
    131200: {"app": "client", NS: "default", CLUSTER: "west"},
    131201: {"app": "client", NS: "other", CLUSTER: "west"},
    131202: {"app": "db", NS: "default", CLUSTER: "west"},
}


def policy(spec: dict[str, Any], ns: str = "default") -> PlexusNetworkPolicy:
    return parse(PlexusNetworkPolicy, {"apiVersion": "plexus.io/v1", "kind": "PlexusNetworkPolicy",
                                       "metadata": {"name": "p", "namespace": ns}, "spec": spec}, "test")


def test_unselected_endpoint_has_no_entries() -> None:
    p = policy({"endpointSelector": {"matchLabels": {"app": "other"}},
                "ingress": [{"fromEndpoints": [{}]}]})
    assert compute([p], IDS, [WEB]) == ([], [])


def test_cluster_label_selects_remote_identities_in_the_policy_namespace() -> None:
    p = policy({"endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {
                    "app": "client", "io.cilium.k8s.policy.cluster": "west"}}],
                    "toPorts": [{"ports": [{"port": 80, "protocol": "TCP"}]}]}]})
    entries, enforced = compute([p], IDS, [WEB])
    assert [e.key[:2] for e in enforced] == [("plxweb", INGRESS)]
    allowed = {(e.identity, e.port, e.proto) for e in entries if e.action == ALLOW}
    assert allowed == {(131200, 80, 6), (ID_HOST, 0, 0)}  # not 131201: another namespace


def test_deny_beats_allow_for_the_same_key() -> None:
    allow = policy({"endpointSelector": {}, "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}]}]})
    deny = policy({"endpointSelector": {}, "egressDeny": [{"toEndpoints": [{"matchLabels": {"app": "db"}}]}]})
    entries, _ = compute([allow, deny], IDS, [WEB])
    db = [e for e in entries if e.identity == 131202]
    assert [(e.direction, e.action) for e in db] == [(EGRESS, DENY)]


def test_match_expressions_and_cidr_identities() -> None:
    p = policy({"endpointSelector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                           "values": ["web", "api"]}]},
                "egress": [{"toEndpoints": [{"matchExpressions": [
                    {"key": "io.cilium.k8s.policy.cluster", "operator": "NotIn", "values": ["east"]},
                    {"key": "app", "operator": "Exists"}]}]},
                           {"toCIDR": ["198.51.100.0/24"], "toPorts": [{"ports": [{"port": 443}]}]}]})
    entries, _ = compute([p], IDS, [WEB])
    peers = {e.identity for e in entries if e.direction == EGRESS}
    assert peers == {131200, 131202, CIDR_IDENTITY_BASE, ID_HOST}
    assert any(e.identity == CIDR_IDENTITY_BASE and e.port == 443 and e.proto == 0 for e in entries)


@pytest.mark.parametrize(("spec", "field"), [
    ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": 70000}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port"),
    ({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.endpointSelector.matchExpressions[0]"),
    ({"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.1/33"]}]}, "spec.ingress[0].fromCIDR[0]"),
    ({"endpointSelector": {}, "ingres": []}, "spec.ingres: unknown field"),
])
def test_malformed_policies_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        policy(spec)
    assert field in str(e.value)

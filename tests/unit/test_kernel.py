"""The registry of kernel numbers: clashes are refused naming both owners, the agent has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp.module import BGPControlPlane
from plexus.agent import build, config_model
from plexus.app import MODULES
from plexus.core.kernel import KERNEL_NUMBERS, Claim, KernelNumberClash, KernelNumbers


def test_a_clash_is_refused_naming_both_owners() -> None:
    numbers = KernelNumbers()
    numbers.claim("route-table", 100, "egress", "egress routes")
    numbers.claim("rule-priority", 100, "egress", "rule to its table")  # another kind: no clash
    with pytest.raises(KernelNumberClash) as e:
        numbers.claim("route-table", 100, "vmagent", "VM routes")
    assert str(e.value) == ("route-table 100 is claimed by egress (egress routes) "
                            "and by vmagent (VM routes)")


@pytest.mark.parametrize(("first", "second"), [(True, False), (False, True)])
def test_a_shared_number_clashes_with_an_exclusive_claim(first: bool, second: bool) -> None:
    numbers = KernelNumbers()
    numbers.claim("route-protocol", 190, "a", "marks routes", shared=first)
    with pytest.raises(KernelNumberClash, match=r"by a .* and by b "):
        numbers.claim("route-protocol", 190, "b", "marks routes", shared=second)


def test_shared_claims_coexist_and_a_repeated_claim_is_one() -> None:
    numbers = KernelNumbers()
    numbers.claim("route-protocol", 190, "a", "marks routes", shared=True)
    numbers.claim("route-protocol", 190, "b", "marks routes", shared=True)
    numbers.claim("tc-priority", 1, "c", "filters")
    numbers.claim("tc-priority", 1, "c", "filters")
    assert [(c.kind, c.number, c.owner) for c in numbers.claims()] == [
        ("route-protocol", 190, "a"), ("route-protocol", 190, "b"), ("tc-priority", 1, "c")]


def agent_config(tmp_path: Path, **sections: Any) -> Any:
    return config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path),
        "clustermesh": {"etcd": {"endpoints": ["http://127.0.0.1:2379"]}, "directRoutes": True},
        "encryption": {"enabled": True},
        "bpf": {"enabled": True},
        "bgp": {"enabled": True},
        **sections,
    })


def test_the_agent_claims_its_numbers_without_clash(tmp_path: Path) -> None:
    app = build(agent_config(tmp_path), MODULES)
    claims = app.hive.require(KERNEL_NUMBERS).claims()
    assert {(c.kind, c.number, c.owner) for c in claims} == {
        ("route-table", 254, "clustermesh"), ("route-protocol", 190, "clustermesh"),
        ("route-table", 51871, "encryption"), ("rule-priority", 100, "encryption"),
        ("route-protocol", 190, "encryption"), ("fwmark", 0x1E00, "encryption"),
        ("rule-priority", 99, "encryption"), ("route-table", 51872, "encryption"),
        ("rule-priority", 98, "encryption"),
        ("tc-priority", 1, "bpf"), ("tc-handle", 1, "bpf"),
        ("address-protocol", 190, "egress")}
    assert all(isinstance(c, Claim) and c.what for c in claims)


def test_a_clash_in_the_agent_config_fails_the_build(tmp_path: Path) -> None:
    # encryption's routes in the main table would be pruned along with clustermesh's
    cfg = agent_config(tmp_path, encryption={"enabled": True, "table": 254})
    with pytest.raises(KernelNumberClash) as e:
        build(cfg, MODULES)
    assert "route-table 254 is claimed by clustermesh (" in str(e.value)
    assert "and by encryption (" in str(e.value)


def test_disabled_features_claim_nothing(tmp_path: Path) -> None:
    cfg = config_model(MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "n1", "ip": "172.31.1.11", "podCIDR": "10.1.1.0/24"},
        "stateDir": str(tmp_path)})
    assert build(cfg, MODULES).hive.optional(KERNEL_NUMBERS) is None


@pytest.mark.parametrize("bgp", [False, True], ids=["vm", "metal-host-with-bgp"])
def test_an_enrolled_hosts_agent_claims_its_numbers_without_clash(tmp_path: Path,
                                                                   bgp: bool) -> None:
    from plexus.app import VM_MODULES
    from vmagent.bundle import Bundle
    from vmagent.join import unpack

    bundle = Bundle.model_validate({
        "name": "metal1", "cluster": "east", "clusterID": 1, "ip": "172.31.3.10",
        "labels": {"role": "metal"}, "expires": "2030-01-01T00:00:00Z",
        "etcd": {"endpoints": ["https://172.31.1.250:2379"], "ca": "ca", "cert": "c", "key": "k"}})
    path = unpack(bundle, tmp_path, tmp_path / "agent.sock", "plxwg0", True,
                  tmp_path / "bpf", strict=True, bgp=bgp)
    app = build(config_model(VM_MODULES).model_validate(yaml.safe_load(path.read_text())),
                VM_MODULES)
    claims = {(c.kind, c.number, c.owner) for c in app.hive.require(KERNEL_NUMBERS).claims()}
    assert ("fwmark", 0x1E00, "encryption") in claims
    assert ("tc-priority", 1, "bpf") in claims
    bare = config_model(VM_MODULES).model_validate({
        "cluster": {"name": "east", "id": 1},
        "node": {"name": "metal1", "ip": "172.31.3.10", "podCIDR": "172.31.3.10/32"},
        "stateDir": str(tmp_path)})
    assert bare.model_dump()["bgp"]["enabled"] is False  # a config without the section
    speaker = app.components["bgp"]
    assert isinstance(speaker, BGPControlPlane) and speaker.config.enabled is bgp  # only with --bgp

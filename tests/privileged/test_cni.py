"""The CNI plugin as a runtime calls it, against a real agent and real namespaces."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.cni import errors as E
from plexus.cni.errors import CniError
from plexus.cni.ops import host_ifname
from plexus.cni.runtime import call_plugin
from plexus.core.client import Client
from tests.support import AgentProcess, netns, sh, start_agent, unique

PREFIX = "plx-tc"


@pytest.fixture
def node() -> Iterator[str]:
    with netns(PREFIX) as ns:
        yield ns


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = start_agent(tmp_path / "agent", pod_cidr="10.1.1.0/29")
    yield a
    a.stop()


@pytest.fixture
def pods() -> Iterator[Any]:
    made: list[str] = []

    def make() -> str:
        name = unique(PREFIX + "p")
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


def conf(agent: AgentProcess, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "plexus", "type": "plexus-cni",
            "agentSocket": str(agent.socket),
            "args": {"plexus": {"labels": {"app": "web"}}}, **extra}


def add(agent: AgentProcess, node: str, pod: str, cid: str, **kw: Any) -> dict[str, Any]:
    return call_plugin("ADD", container_id=cid, netns=f"/var/run/netns/{pod}", host_netns=node,
                       config=conf(agent), cni_args={"K8S_POD_NAMESPACE": "default",
                                                     "K8S_POD_NAME": cid}, **kw)


def links(ns: str) -> set[str]:
    out = sh("ip", "-o", "link", "show", ns=ns).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def ipam_files(agent: AgentProcess) -> list[str]:
    d = agent.state_dir / "ipam"
    return sorted(p.name for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_version(agent: AgentProcess) -> None:
    out = call_plugin("VERSION", container_id="", netns="", config={"cniVersion": "1.0.0"})
    assert "1.0.0" in out["supportedVersions"]


def test_add_check_del_and_pods_on_a_node_reach_each_other(
        agent: AgentProcess, node: str, pods: Any) -> None:
    p1, p2 = pods(), pods()
    r1 = add(agent, node, p1, "c1")
    r2 = add(agent, node, p2, "c2")
    ip1 = r1["ips"][0]["address"].split("/")[0]
    ip2 = r2["ips"][0]["address"].split("/")[0]
    assert ipaddress.ip_address(ip1) in ipaddress.ip_network("10.1.1.0/29")
    assert ip1 != ip2
    assert r1["interfaces"][1] == {"name": "eth0", "mac": r1["interfaces"][1]["mac"],
                                   "sandbox": f"/var/run/netns/{p1}"}
    assert host_ifname("c1") in links(node)
    sh("ping", "-c", "1", "-W", "2", ip2, ns=p1)
    sh("ping", "-c", "1", "-W", "2", ip1, ns=p2)

    registered = {e["container_id"]: e for e in Client(agent.socket).get("/v1/endpoints")}
    assert registered["c1"]["ip"] == ip1 and registered["c1"]["labels"] == {"app": "web"}
    assert registered["c1"]["pod_name"] == "c1" and registered["c1"]["namespace"] == "default"

    # ADD again is idempotent: same address, one interface.
    again = add(agent, node, p1, "c1")
    assert again["ips"] == r1["ips"]
    assert sorted(ipam_files(agent)) == sorted([ip1, ip2])

    call_plugin("CHECK", container_id="c1", netns=f"/var/run/netns/{p1}", host_netns=node,
                config=conf(agent, prevResult=r1))

    # CHECK notices what broke.
    sh("ip", "route", "del", "default", ns=p1)
    with pytest.raises(CniError) as e:
        call_plugin("CHECK", container_id="c1", netns=f"/var/run/netns/{p1}", host_netns=node,
                    config=conf(agent, prevResult=r1))
    assert "default route" in e.value.details

    call_plugin("DEL", container_id="c1", netns=f"/var/run/netns/{p1}", host_netns=node,
                config=conf(agent))
    assert host_ifname("c1") not in links(node)
    assert ipam_files(agent) == [ip2]
    assert [x["container_id"] for x in Client(agent.socket).get("/v1/endpoints")] == ["c2"]
    # DEL twice, and DEL of a container never seen, succeed.
    call_plugin("DEL", container_id="c1", netns=f"/var/run/netns/{p1}", host_netns=node,
                config=conf(agent))
    call_plugin("DEL", container_id="never", netns="", host_netns=node, config=conf(agent))
    # DEL after the pod's namespace is gone succeeds and frees everything.
    sh("ip", "netns", "del", p2)
    call_plugin("DEL", container_id="c2", netns=f"/var/run/netns/{p2}", host_netns=node,
                config=conf(agent))
    assert ipam_files(agent) == []
    assert not any(link.startswith("plx") for link in links(node))


def test_exhaustion_errors_and_leaves_nothing(agent: AgentProcess, node: str, pods: Any) -> None:
    for i in range(6):  # a /29 has six usable addresses
        add(agent, node, pods(), f"x{i}")
    before = links(node)
    with pytest.raises(CniError) as e:
        add(agent, node, pods(), "x6")
    assert e.value.code == E.IP_EXHAUSTED
    assert links(node) == before
    assert len(ipam_files(agent)) == 6


def test_agent_down_fails_cleanly(tmp_path: Path, node: str, pods: Any) -> None:
    a = start_agent(tmp_path / "gone", pod_cidr="10.1.1.0/29")
    a.stop()
    with pytest.raises(CniError) as e:
        add(a, node, pods(), "c1")
    assert e.value.code == E.AGENT_UNAVAILABLE
    assert links(node) == {"lo"}


@pytest.mark.parametrize(("mutate", "code", "words"), [
    (lambda c, env: c.update(cniVersion="9.9.9"), E.INCOMPATIBLE_VERSION, "not supported"),
    (lambda c, env: c.update(bogus=1), E.INVALID_CONFIG, "bogus"),
    (lambda c, env: c.pop("agentSocket"), E.INVALID_CONFIG, "agentSocket"),
    (lambda c, env: env.update(container_id="bad id;rm"), E.INVALID_ENV, "CNI_CONTAINERID"),
    (lambda c, env: env.update(container_id=""), E.INVALID_ENV, "CNI_CONTAINERID"),
    (lambda c, env: env.update(ifname="x" * 16), E.INVALID_ENV, "CNI_IFNAME"),
    (lambda c, env: env.update(netns="/var/run/netns/plx-tc-none"), E.INVALID_ENV, "CNI_NETNS"),
    (lambda c, env: c.update(args={"plexus": {"labels": {"app": 5}}}), E.INVALID_CONFIG, "labels"),
])
def test_malformed_requests_get_spec_errors_and_change_nothing(
        agent: AgentProcess, node: str, pods: Any, mutate: Any, code: int, words: str) -> None:
    pod = pods()
    config = conf(agent)
    env = {"container_id": "c1", "netns": f"/var/run/netns/{pod}", "ifname": "eth0"}
    mutate(config, env)
    with pytest.raises(CniError) as e:
        call_plugin("ADD", config=config, host_netns=node, container_id=env["container_id"],
                    netns=env["netns"], ifname=env["ifname"])
    assert e.value.code == code
    assert words in e.value.msg + e.value.details
    assert links(node) == {"lo"}
    assert ipam_files(agent) == []
    assert Client(agent.socket).get("/v1/endpoints") == []


def test_undecodable_config(agent: AgentProcess, node: str) -> None:
    import subprocess
    import sys

    r = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "plexus.cni"],
                       input="{not json", capture_output=True, text=True,
                       env={"CNI_COMMAND": "ADD", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                            "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 1
    assert '"code": 6' in r.stdout

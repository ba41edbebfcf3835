"""Visibility across the mesh in the lab: every node's flows through each cluster's relay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import pod_netns
from tests.e2e.test_lab import apply_in, lab_namespaces, plexus
from tests.support import echo, echo_server, wait_until

SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: vweb
  namespace: default
  annotations: {service.cilium.io/global: "true", service.cilium.io/affinity: none}
spec:
  clusterIP: VIP
  selector: {app: vweb}
  ports:
    - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}
"""
EAST_VIP, WEST_VIP = "10.96.1.30", "10.96.2.30"
POLICY = """apiVersion: plexus.io/v1
kind: PlexusNetworkPolicy
metadata: {name: vweb-from-vclient, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: vweb}}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: vclient}
      toPorts:
        - ports: [{port: 8080, protocol: TCP}]
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if lab_namespaces():
        plexus("lab", "down")
        assert not lab_namespaces(), "a lab is up and `plexus lab down` could not remove it"
    r = plexus("lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield Lab(say=lambda _line: None)
    finally:
        plexus("lab", "down")


@pytest.fixture(scope="module")
def traffic(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A web pod in east behind a global service, an allowed and a denied client in west."""
    tmp = tmp_path_factory.mktemp("visibility")
    lab.pod_add("east", "n1", "vweb", {"app": "vweb"})
    lab.pod_add("west", "n1", "vcl", {"app": "vclient"})
    lab.pod_add("west", "n2", "vbad", {"app": "vbad"})
    for cluster, vip in (("east", EAST_VIP), ("west", WEST_VIP)):
        r = apply_in(cluster, SERVICE.replace("VIP", vip), tmp)
        assert r.returncode == 0, r.stderr
    r = apply_in("east", POLICY, tmp)
    assert r.returncode == 0, r.stderr
    nss = {name: pod_netns(lab.topo.node(c, n), name) for name, c, n in
           (("vweb", "east", "n1"), ("vcl", "west", "n1"), ("vbad", "west", "n2"))}
    with ExitStack() as stack:
        stack.enter_context(echo_server(nss["vweb"], "tcp", 8080))
        wait_until(lambda: echo(nss["vcl"], "tcp", WEST_VIP, 80, "x", timeout=1), 60,
                   what="west client reaches the east service")
        yield nss


def relay_flows(cluster: str, *filters: str, last: int = 1000) -> list[dict[str, Any]]:
    r = plexus("observe", "--lab", cluster, "--last", str(last), "-o", "json", *filters)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_relay_shows_both_ends_of_a_west_pod_to_east_service_flow(lab: Lab, traffic: dict[str, str]) -> None:
    assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "both ends")
    assert not echo(traffic["vbad"], "tcp", WEST_VIP, 80, "denied", timeout=1)

    def both_ends() -> bool:
        docs = relay_flows("east", "--pod", "default/vweb")
        nodes = {(d["flow"]["node_name"], d["flow"]["verdict"], d["flow"]["traffic_direction"])
                 for d in docs if "flow" in d}
        return {("west/n1", "TRANSLATED", "EGRESS"), ("west/n1", "FORWARDED", "EGRESS"),
                ("east/n1", "FORWARDED", "INGRESS"), ("east/n1", "DROPPED", "INGRESS")} <= nodes

    wait_until(both_ends, 30, what="both ends' verdicts through east's relay")
    docs = [d for d in relay_flows("east", "--pod", "default/vweb") if "flow" in d]
    flows = [d["flow"] for d in docs]
    # merged in time order
    assert [f["time"] for f in flows] == sorted(f["time"] for f in flows)
    translated = next(f for f in flows if f["verdict"] == "TRANSLATED")
    assert translated["source"]["pod_name"] == "vcl" and translated["source"]["cluster_name"] == "west"
    assert translated["destination"]["pod_name"] == "vweb"
    assert translated["destination"]["cluster_name"] == "east"
    assert translated["destination_service"] == {"name": "vweb", "namespace": "default"}
    denied = next(f for f in flows if f["verdict"] == "DROPPED")
    assert denied["node_name"] == "east/n1" and denied["drop_reason_desc"] == "POLICY_DENIED"
    assert denied["source"]["pod_name"] == "vbad" and denied["source"]["cluster_name"] == "west"
    assert denied["l4"]["TCP"]["destination_port"] == 8080

    # west's relay sees the same mesh; filters work through it
    west = relay_flows("west", "--verdict", "DROPPED", "--from-pod", "default/vbad")
    assert west and all(d["flow"]["source"]["pod_name"] == "vbad" for d in west)
    compact = plexus("observe", "--lab", "west", "--last", "5", "--to-pod", "default/vweb")
    assert compact.returncode == 0 and "default/vweb" in compact.stdout, compact.stderr

    r = plexus("relay", "status", "--lab", "east", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["connected"] == 4 and {n["name"] for n in st["nodes"]} == {
        "east/n1", "east/n2", "west/n1", "west/n2"}
    assert st["flows"] >= len(flows) and st["lost"] == 0


def test_a_down_node_is_reported_not_fatal(lab: Lab, traffic: dict[str, str]) -> None:
    state = State.load(lab.state_path)
    agent = state.processes["agent-west-n2"]
    ops.stop(agent.pid, agent.marker)
    try:
        def west_n2_down() -> bool:
            st = json.loads(plexus("relay", "status", "--lab", "east", "-o", "json").stdout)
            states = {n["name"]: n["state"] for n in st["nodes"]}
            return states.get("west/n2") == "down" and st["connected"] == 3
        wait_until(west_n2_down, 30, what="west/n2 reported down, the others connected")
        r = plexus("relay", "status", "--lab", "east")
        assert r.returncode == 1 and "west/n2" in r.stdout and "down" in r.stdout
        # the others still stream
        assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "still")
        before = len(relay_flows("east", "--from-pod", "default/vcl"))
        assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "again")
        wait_until(lambda: len(relay_flows("east", "--from-pod", "default/vcl")) > before, 15,
                   what="new flows through the relay while a node is down")
    finally:
        lab.start("agent-west-n2")

    def all_connected() -> bool:
        st = json.loads(plexus("relay", "status", "--lab", "east", "-o", "json").stdout)
        return bool(st["connected"] == 4)
    wait_until(all_connected, 30, what="west/n2 connected again")



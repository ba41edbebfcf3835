"""EgressGatewayPolicy through the real manifest path: `plexus apply -f` into etcd, the
agent's watcher, the egress module, `plexus egress list`; a bad new version keeps the last
good one running, `plexus delete` removes it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clustermesh.kvstore import KvStore
from clustermesh.models import (
    WRITTEN_CANARIES,
    ClusterConfig,
    Identity,
    IPIdentity,
    Node,
    NodeAddress,
    synced_key,
)
from plexus.core.client import Client
from tests.support import Etcd, start_agent, wait_until

ROOT = Path(__file__).resolve().parents[2]
POLICY = """apiVersion: plexus.io/v1
kind: EgressGatewayPolicy
metadata: {name: legacy-db}
spec:
  selectors:
  - podSelector: {matchLabels: {app: billing}}
  destinationCIDRs: [198.51.100.0/24]
  excludedCIDRs: [198.51.100.128/25]
  egressIP: 10.255.0.10
  egressGateways:
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n2}}
  - nodeSelector: {matchLabels: {kubernetes.io/hostname: n1}}
"""


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plexus", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


async def _seed(endpoint: str) -> None:
    """The mesh state an apiserver would have written: two nodes and one billing pod."""
    billing = Identity(65537, ("k8s:app=billing", "k8s:io.cilium.k8s.policy.cluster=east",
                               "k8s:io.kubernetes.pod.namespace=default"), "east")
    async with KvStore([endpoint]) as kv:
        await kv.put("cilium/cluster-config/east", ClusterConfig(id=1).to_json())
        for i in (1, 2):
            n = Node(name=f"n{i}", cluster="east", cluster_id=1,
                     addresses=(NodeAddress("InternalIP", f"172.31.1.1{i}"),),
                     ipv4_alloc_cidr=f"10.1.{i}.0/24")
            await kv.put(n.kv_key, n.to_json())
        await kv.put(billing.kv_key, billing.label_string())
        pod = IPIdentity("10.1.1.5", 65537, host_ip="172.31.1.11", namespace="default",
                         pod_name="bill")
        await kv.put(pod.kv_key, pod.to_json())
        for prefix in WRITTEN_CANARIES:
            await kv.put(synced_key("east", prefix), "2026-01-01T00:00:00Z")


def test_apply_reaches_the_agent_and_a_bad_version_keeps_the_good_one(tmp_path: Path,
                                                                      etcd: Etcd) -> None:
    asyncio.run(_seed(etcd.endpoint))
    agent = start_agent(tmp_path / "agent", extra=(
        f"clustermesh: {{etcd: {{endpoints: ['{etcd.endpoint}']}}}}\n"
        "bgp: {enabled: false}\n"))
    try:
        api = Client(agent.socket)

        def listing() -> dict[str, Any]:
            out: dict[str, Any] = api.get("/v1/egress/list")
            return out

        f = tmp_path / "policy.yaml"
        f.write_text(POLICY)
        r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
        assert r.returncode == 0, r.stderr
        assert "egressgatewaypolicy/default/legacy-db applied" in r.stdout

        key = "plexus/manifests/v1/east/EgressGatewayPolicy/default/legacy-db"

        async def created(set_to: str = "") -> str:
            async with KvStore([etcd.endpoint]) as kv:
                got = await kv.get(key)
                assert got is not None
                body = json.loads(got.value)
                if set_to:
                    body["metadata"]["creationTimestamp"] = set_to
                    await kv.put(key, json.dumps(body))
                stamp: str = body["metadata"]["creationTimestamp"]
                return stamp

        # Stamped when first stored; applied again (changed), it keeps that time: its age.
        first = datetime.strptime(asyncio.run(created()), "%Y-%m-%dT%H:%M:%S%z")
        assert abs((datetime.now(UTC) - first).total_seconds()) < 120
        asyncio.run(created(set_to="2020-01-01T00:00:00Z"))
        f.write_text(POLICY.replace("excludedCIDRs: [198.51.100.128/25]", "excludedCIDRs: []"))
        r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
        assert r.returncode == 0, r.stderr
        assert asyncio.run(created()) == "2020-01-01T00:00:00Z"
        f.write_text(POLICY)
        r = plexus("apply", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
        assert r.returncode == 0, r.stderr

        def active() -> Any:
            ps = listing()["policies"]
            return ps and ps[0]["endpoints"] and ps[0]["active"]

        wait_until(active, 30, what="the policy with its endpoint and active gateway")
        [p] = listing()["policies"]
        assert p["name"] == "east/default/legacy-db"
        assert [g["node"] for g in p["gateways"]] == ["east/n2", "east/n1"]
        assert [(e["ip"], e["node"]) for e in p["endpoints"]] == [("10.1.1.5", "east/n1")]
        assert p["active"] == [{"sourceNode": "east/n1", "gateway": "east/n2",
                                "egressIP": "10.255.0.10", "interface": None,
                                "healthFrom": "this node's probes"}]
        r = plexus("egress", "list", "--socket", str(agent.socket), "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout) == listing(), r.stderr
        r = plexus("egress", "list", "--socket", str(agent.socket))
        assert "policy east/default/legacy-db" in r.stdout and "10.255.0.10" in r.stdout

        # A bad version written past `plexus apply` (which would refuse it) is reported by
        # the agent, naming the field, and the last good version keeps running.
        async def write_bad() -> None:
            async with KvStore([etcd.endpoint]) as kv:
                key = "plexus/manifests/v1/east/EgressGatewayPolicy/default/legacy-db"
                got = await kv.get(key)
                assert got is not None
                body = json.loads(got.value)
                body["spec"]["egressGateways"][1]["egressIP"] = "127.0.0.1"
                await kv.put(key, json.dumps(body))

        asyncio.run(write_bad())
        wait_until(lambda: listing()["rejected"], 30, what="the bad version reported")
        [why] = listing()["rejected"].values()
        assert "spec.egressGateways[1].egressIP" in why and "keeping the last good version" in why
        assert listing()["policies"][0]["active"][0]["gateway"] == "east/n2"

        r = plexus("delete", "-f", str(f), "--cluster", "east", "--etcd", etcd.endpoint)
        assert r.returncode == 0 and "deleted" in r.stdout, r.stderr
        wait_until(lambda: not listing()["policies"] and not listing()["rejected"], 30,
                   what="the policy gone")
    finally:
        agent.stop()

"""Egress derivation: what one change costs the agent before the datapath sees it.

    .venv/bin/python -m bench.egress.derive [--endpoints 10000] [--policies 10] [--nodes 20]
        [--changes 50]

Two clusters of `--nodes` nodes each, `--endpoints` pods spread over them (a tenth carry the
label a policy selects, one app label per policy), `--policies` policies of two
destinations, one excluded CIDR and two gateways each. One change is a pod added with a
selected label (an ipcache row; its identity exists), then as many with a label no policy
selects. Timed: the egress module's
`recompute()` (policies parsed, endpoints of every cluster selected, gateways chosen,
entries derived and tables replaced) after each change, and how many entries it holds.
The package takes the machine lock itself (bench/__init__.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clustermesh.models import Identity, IPIdentity, Node, NodeAddress
from clustermesh.tables import IDENTITIES, IPCACHE, NODES, identities_table, ipcache_table, nodes_table
from egress.config import EgressConfig
from egress.module import EgressGateways
from plexus.core.manifests import MANIFESTS, Manifest, manifests_table
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE, LocalNode

CLUSTERS = (("east", 1), ("west", 2))


def policy(i: int) -> dict[str, Any]:
    return {"apiVersion": "plexus.io/v1", "kind": "EgressGatewayPolicy",
            "metadata": {"name": f"p{i}"},
            "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": f"app{i}"}}}],
                     "destinationCIDRs": [f"198.51.{i}.0/24", f"203.0.{i}.0/24"],
                     "excludedCIDRs": [f"198.51.{i}.128/25"], "egressIP": f"10.255.0.{i + 1}",
                     "egressGateways": [
                         {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "n1"}}},
                         {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "n2"}}}]}}


def node_ip(cid: int, n: int) -> str:
    """Node n (from 1) of cluster `cid`: up to 64,000 nodes per cluster."""
    return f"172.{16 + cid}.{(n - 1) // 250}.{(n - 1) % 250 + 1}"


def pod_cidr(cid: int, n: int) -> str:
    return f"10.{cid * 64 + (n - 1) // 256}.{(n - 1) % 256}.0/24"


def build(args: argparse.Namespace, state_dir: Path) -> tuple[EgressGateways, Any]:
    hive = Hive(agent=None, state_dir=state_dir)  # nothing is written there
    hive.provide(LOCAL_NODE, LocalNode("east", 1, "n1", node_ip(1, 1), pod_cidr(1, 1)))
    mf = hive.provide(MANIFESTS, manifests_table())
    nodes, ipc, ids = nodes_table(), ipcache_table(), identities_table()
    for cluster, cid in CLUSTERS:
        for n in range(1, args.nodes + 1):
            nodes.upsert(Node(name=f"n{n}", cluster=cluster, cluster_id=cid,
                              addresses=(NodeAddress("InternalIP", node_ip(cid, n)),),
                              ipv4_alloc_cidr=pod_cidr(cid, n)))
        for app in range(args.policies * 10):  # apps 0..policies-1 are selected
            ident = (cid << 16) + 256 + app
            ids.upsert(Identity(ident, (f"k8s:app=app{app}", f"k8s:io.cilium.k8s.policy.cluster={cluster}",
                                        "k8s:io.kubernetes.pod.namespace=default"), cluster))
    for i in range(args.endpoints):
        ipc.upsert(pod(i, args))
    for i in range(args.policies):
        mf.upsert(Manifest("east", "EgressGatewayPolicy", "default", f"p{i}", policy(i)))
    hive.provide(NODES, nodes)
    hive.provide(IPCACHE, ipc)
    hive.provide(IDENTITIES, ids)
    return EgressGateways(hive, EgressConfig()), ipc


def pod(i: int, args: argparse.Namespace) -> IPIdentity:
    cluster, cid = CLUSTERS[i % 2]
    n = (i // 2) % args.nodes + 1
    app = i % (args.policies * 10)
    host = i // (2 * args.nodes)
    net = pod_cidr(cid, n).split(".")
    ip = f"{net[0]}.{net[1]}.{net[2]}.{host % 250 + 2}" if host < 250 else \
        f"11.{cid * 64 + (n - 1) // 256}.{(n - 1) % 256}.{host % 250}"
    return IPIdentity(ip, (cid << 16) + 256 + app, host_ip=node_ip(cid, n), namespace="default",
                      pod_name=f"pod{i}", cluster=cluster)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--policies", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plexus-bench-egress-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, state_dir: Path) -> int:
    eg, ipc = build(args, state_dir)
    t = time.perf_counter()
    eg.recompute()
    first = time.perf_counter() - t
    times = []
    for c in range(args.changes):
        new = pod(args.endpoints + c * args.policies * 10, args)  # app0: selected by p0
        ipc.upsert(IPIdentity(f"10.200.{c // 250}.{c % 250 + 1}", new.identity, host_ip=new.host_ip,
                              namespace="default", pod_name=f"new{c}", cluster=new.cluster))
        t = time.perf_counter()
        eg.recompute()
        times.append(time.perf_counter() - t)
        assert eg.entries.get((f"10.200.{c // 250}.{c % 250 + 1}", "198.51.0.0/24")) is not None
    times.sort()
    # pods no policy selects (most of a mesh's churn): nothing derived can change
    other = []
    for c in range(args.changes):
        new = pod(args.endpoints + c * args.policies * 10 + args.policies, args)  # not selected
        ipc.upsert(IPIdentity(f"10.201.{c // 250}.{c % 250 + 1}", new.identity, host_ip=new.host_ip,
                              namespace="default", pod_name=f"other{c}", cluster=new.cluster))
        t = time.perf_counter()
        eg.recompute()
        other.append(time.perf_counter() - t)
    other.sort()
    selected = sum(len(p.endpoints) for p in eg.policies)
    print(f"endpoints {args.endpoints}, policies {args.policies}, nodes {2 * args.nodes}: "
          f"{selected} selected, {len(eg.entries)} entries")
    print(f"first recompute: {first * 1000:.0f} ms")
    print(f"recompute after one selected pod added: p50 {statistics.median(times) * 1000:.0f} ms, "
          f"p99 {times[min(len(times) - 1, int(len(times) * 0.99))] * 1000:.0f} ms "
          f"over {len(times)} changes")
    print(f"recompute after one unselected pod added: p50 {statistics.median(other) * 1000:.1f} ms, "
          f"p99 {other[min(len(other) - 1, int(len(other) * 0.99))] * 1000:.1f} ms")
    print("rerun: .venv/bin/python -m bench.egress.derive " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

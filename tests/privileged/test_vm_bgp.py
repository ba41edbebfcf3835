"""A metal host joined with `--bgp`: the agent config `plexus vm join` writes runs the BGP
module, which peers with the host's router (BIRD 2 in a namespace) as the cluster's BGP
manifests that select the host's labels say, and announces the address the host serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp.config import BGPConfig
from bgp.module import BGPControlPlane
from clustermesh.tables import SERVICES, services_table
from plexus.core.manifests import MANIFESTS, Manifest, manifests_table
from plexus.core.module import Hive
from plexus.core.node import LOCAL_NODE, LocalNode
from tests.bgp_lab import NODE_ASN, NODE_IP, ROUTER_ASN, ROUTER_IP, bgp_lab
from tests.support import eventually
from vmagent.bundle import Bundle
from vmagent.join import unpack

pytestmark = pytest.mark.usefixtures("root")
CLUSTER = "east"


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> Manifest:
    body = {"apiVersion": "plexus.io/v1", "kind": kind,
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec}
    return Manifest(CLUSTER, kind, "default", name, body)


MANIFESTS_FOR_METAL = [
    doc("BGPClusterConfig", "metal", {
        "nodeSelector": {"matchLabels": {"role": "metal"}},
        "bgpInstances": [{"name": "i0", "localASN": NODE_ASN, "peers": [
            {"name": "tor", "peerAddress": ROUTER_IP, "peerASN": ROUTER_ASN,
             "peerConfigRef": {"name": "tor"}}]}]}),
    doc("BGPPeerConfig", "tor", {
        "timers": {"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3},
        "families": [{"afi": "ipv4", "safi": "unicast",
                      "advertisements": {"matchLabels": {"advertise": "metal"}}}]}),
    doc("BGPAdvertisement", "host", {"advertisements": [{"advertisementType": "PodCIDR"}]},
        {"advertise": "metal"}),
]


def joined_config(tmp_path: Path, bgp: bool) -> dict[str, Any]:
    """The agent config `plexus vm join [--bgp]` writes for a host at NODE_IP."""
    bundle = Bundle.model_validate({
        "name": "metal1", "cluster": CLUSTER, "clusterID": 1, "ip": NODE_IP,
        "labels": {"role": "metal"}, "expires": "2030-01-01T00:00:00Z",
        "etcd": {"endpoints": ["https://192.0.2.250:2379"], "ca": "ca", "cert": "c", "key": "k"}})
    path = unpack(bundle, tmp_path / "state", tmp_path / "agent.sock", "plxwg0", True,
                  bgp=bgp)
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


async def test_a_metal_host_joined_with_bgp_announces_its_address_to_its_router(
        tmp_path: Path) -> None:
    assert joined_config(tmp_path / "plain", bgp=False)["bgp"] == {"enabled": False}
    config = joined_config(tmp_path / "metal", bgp=True)
    assert config["bgp"] == {"enabled": True}
    node = config["node"]
    with bgp_lab() as lab:
        lab.start_bird()
        hive = Hive(agent=None, state_dir=tmp_path)
        hive.provide(LOCAL_NODE, LocalNode(CLUSTER, 1, node["name"], node["ip"], node["podCIDR"],
                                           labels=node["labels"]))
        manifests = hive.provide(MANIFESTS, manifests_table())
        hive.provide(SERVICES, services_table())
        exabgp = ["ip", "netns", "exec", lab.node_ns, *BGPConfig().exabgp]
        speaker = BGPControlPlane(hive, BGPConfig(**config["bgp"], exabgp=exabgp,
                                                  secrets_dir=tmp_path / "secrets"))
        for m in MANIFESTS_FOR_METAL:
            manifests.upsert(m)
        try:
            await speaker.start()
            await eventually(lab.established, 30, 0.2, "the host's session with its router")
            await eventually(lambda: set(lab.routes()) == {f"{NODE_IP}/32"}, 20, 0.2,
                             "the router learns the host's address, and nothing else")
            # a host the cluster's BGP config no longer selects peers with no one
            manifests.upsert(doc("BGPClusterConfig", "metal", {
                **MANIFESTS_FOR_METAL[0].body["spec"],
                "nodeSelector": {"matchLabels": {"role": "other"}}}))
            await eventually(lambda: not lab.established(), 20, 0.2, "the session closed")
            assert not speaker.problems, speaker.problems
        finally:
            await speaker.stop()

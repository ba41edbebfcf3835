"""Every value Plexus writes to etcd, byte for byte what Cilium's Go code writes for the same
object, and read back to the same row. Each expected value is written out by hand from the
Cilium source named next to it (Go's json.Marshal: compact, struct-field order, map keys
sorted, `omitempty` honoured, nil slices and maps as null, an unset net.IP as "")."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustermesh.apiserver import ApiServer
from clustermesh.config import read_remote_cluster_file
from clustermesh.identity import legacy_value_key, value_key
from clustermesh.manifests import Service
from clustermesh.models import (
    ClusterConfig,
    ClusterService,
    EndpointRegistration,
    Identity,
    InvalidValue,
    IPIdentity,
    L4Addr,
    NamedPort,
    Node,
    NodeAddress,
    format_labels,
    go_json,
    go_time,
    identity_cluster_id,
    identity_labels,
    identity_range,
    parse_labels,
)
from clustermesh.services import merge
from plexus.core.config import ConfigError, parse

WG_KEY = "dGhpcyBpcyBhIHdpcmVndWFyZCBrZXkgMzIgYnl0ZXM="
BOOT_ID = "4e6b3d1a-39f0-4c47-b4a2-1f0e2c7d9a10"


# ---- cilium/cluster-config/<cluster> -------------------------------------------------
# pkg/clustermesh/types/types.go: CiliumClusterConfig{ID `id,omitempty`; Capabilities
# `capabilities,omitempty` (a struct, so always written)}, capabilities all omitempty,
# ServiceExportsEnabled a *bool (false is written, nil is not).

def test_cluster_config_is_what_ciliums_apiserver_writes() -> None:
    cfg = ClusterConfig(id=1)
    want = ('{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,'
            '"serviceExportsEnabled":false}}')
    assert cfg.to_json() == want
    assert ClusterConfig.from_json(want) == cfg


@pytest.mark.parametrize(("raw", "row"), [
    # Cilium before MCS-API, and Plexus before this release: no serviceExportsEnabled
    ('{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}',
     ClusterConfig(3, service_exports_enabled=None)),
    ('{"id": 3, "capabilities": {"syncedCanaries": true, "maxConnectedClusters": 255}}',
     ClusterConfig(3, service_exports_enabled=None)),
    # kvstoremesh caches; a 511-cluster mesh; an absent maxConnectedClusters is 255
    ('{"id":300,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":511,'
     '"serviceExportsEnabled":true}}', ClusterConfig(300, True, 511, True, True)),
    ('{"id":4,"capabilities":{}}', ClusterConfig(4, False, 255, service_exports_enabled=None)),
])
def test_cluster_configs_cilium_and_older_plexus_write_are_read(raw: str, row: ClusterConfig) -> None:
    assert ClusterConfig.from_json(raw) == row


def test_cluster_config_omits_what_is_empty() -> None:
    assert ClusterConfig(2, synced_canaries=False, max_connected_clusters=0,
                         service_exports_enabled=None).to_json() == '{"id":2,"capabilities":{}}'


# ---- cilium/state/nodes/v1/<cluster>/<node> ------------------------------------------
# pkg/node/types/node.go: Node, no json tags; CIDRs as net.IPNet {"IP","Mask"} (pkg/node/types
# prefix.go keeps that form on the wire); Source from pkg/source/source.go: the apiserver
# publishes CiliumNodes, source.CustomResource; the WireGuard key also as the annotation
# network.cilium.io/wg-pub-key (pkg/annotation).

NODE = Node(
    name="n1", cluster="east", cluster_id=1,
    addresses=(NodeAddress("InternalIP", "172.31.1.11"), NodeAddress("ExternalIP", "198.51.100.7"),
               NodeAddress("CiliumInternalIP", "10.1.1.1"), NodeAddress("InternalIP", "fd00::11")),
    ipv4_alloc_cidr="10.1.1.0/24", ipv6_alloc_cidr="fd00:1:1::/64",
    secondary_alloc_cidrs=("10.1.200.0/24",), ipv4_health_ip="10.1.1.2", ipv4_ingress_ip="10.1.1.3",
    labels={"kubernetes.io/hostname": "n1", "kubernetes.io/arch": "amd64"},
    wireguard_pubkey=WG_KEY, encryption_key=0, boot_id=BOOT_ID)
NODE_BYTES = (
    '{"Name":"n1","Cluster":"east","IPAddresses":[{"Type":"InternalIP","IP":"172.31.1.11"},'
    '{"Type":"ExternalIP","IP":"198.51.100.7"},{"Type":"CiliumInternalIP","IP":"10.1.1.1"},'
    '{"Type":"InternalIP","IP":"fd00::11"}],'
    '"IPv4AllocCIDR":{"IP":"10.1.1.0","Mask":"////AA=="},'
    '"IPv4SecondaryAllocCIDRs":[{"IP":"10.1.200.0","Mask":"////AA=="}],'
    '"IPv6AllocCIDR":{"IP":"fd00:1:1::","Mask":"//////////8AAAAAAAAAAA=="},'
    '"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.1.1.2","IPv6HealthIP":"",'
    '"IPv4IngressIP":"10.1.1.3","IPv6IngressIP":"","ClusterID":1,"Source":"custom-resource",'
    '"EncryptionKey":0,"Labels":{"kubernetes.io/arch":"amd64","kubernetes.io/hostname":"n1"},'
    f'"Annotations":{{"network.cilium.io/wg-pub-key":"{WG_KEY}"}},'
    f'"WireguardPubKey":"{WG_KEY}","BootID":"{BOOT_ID}"}}')


def test_node_is_what_cilium_writes() -> None:
    assert NODE.to_json() == NODE_BYTES
    back = Node.from_json(NODE_BYTES)
    assert back == Node(**{**NODE.__dict__,
                           "annotations": {"network.cilium.io/wg-pub-key": WG_KEY}})
    assert back.to_json() == NODE_BYTES


def test_a_bare_node_writes_nil_as_go_does() -> None:
    assert Node("n2", "west", 2).to_json() == (
        '{"Name":"n2","Cluster":"west","IPAddresses":null,"IPv4AllocCIDR":null,'
        '"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,'
        '"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":2,'
        '"Source":"custom-resource","EncryptionKey":0,"Labels":null,"Annotations":null,'
        '"WireguardPubKey":"","BootID":""}')


def test_node_fields_plexus_does_not_know_round_trip() -> None:
    # an older Cilium's NodeIdentity, a newer one's anything: kept and written back
    raw = NODE_BYTES[:-1] + ',"NodeIdentity":0,"Zone":{"name":"a"}}'
    back = Node.from_json(raw)
    assert back.extra == {"NodeIdentity": 0, "Zone": {"name": "a"}}
    assert Node.from_json(back.to_json()) == back


def test_a_node_older_plexus_wrote_is_read() -> None:
    old = ('{"Name": "n1", "Cluster": "east", "IPAddresses": [{"Type": "InternalIP", "IP": '
           '"172.31.1.11"}], "IPv4AllocCIDR": {"IP": "10.1.1.0", "Mask": "////AA=="}, '
           '"IPv6AllocCIDR": null, "ClusterID": 1, "Source": "plexus", "Labels": {}, '
           '"WireguardPubKey": ""}')
    node = Node.from_json(old)
    assert (node.name, node.ipv4_alloc_cidr, node.source, node.boot_id) == \
        ("n1", "10.1.1.0/24", "plexus", "")


def test_the_apiserver_publishes_a_registered_node_as_a_cilium_node() -> None:
    server = ApiServer(kv=None, cluster="east", cluster_id=1)  # type: ignore[arg-type]
    registered = Node(**{**NODE.__dict__, "cluster_id": 0, "source": "plexus"})
    server._apply("plexus/registrations/v1/east/nodes/n1", registered.to_json().encode())
    assert server.sources.nodes["plexus/registrations/v1/east/nodes/n1"].to_json() == NODE_BYTES


# ---- cilium/state/ip/v1/default/<ip> --------------------------------------------------
# pkg/identity/identity.go: IPIdentityPair{IP, Mask (nil -> null), HostIP, ID, Key, Metadata,
# K8sNamespace/K8sPodName/K8sServiceAccount/NamedPorts omitempty}; named ports sorted by name
# (pkg/ipcache/kvstore.go).

def test_endpoint_is_what_cilium_writes() -> None:
    entry = IPIdentity(ip="10.1.1.5", identity=65793, host_ip="172.31.1.11", namespace="default",
                       pod_name="web-1", service_account="web",
                       named_ports=(NamedPort("metrics", 9090, "TCP"), NamedPort("http", 8080, "TCP")))
    want = ('{"IP":"10.1.1.5","Mask":null,"HostIP":"172.31.1.11","ID":65793,"Key":0,"Metadata":"",'
            '"K8sNamespace":"default","K8sPodName":"web-1","K8sServiceAccount":"web",'
            '"NamedPorts":[{"Name":"http","Port":8080,"Protocol":"TCP"},'
            '{"Name":"metrics","Port":9090,"Protocol":"TCP"}]}')
    assert entry.to_json() == want
    back = IPIdentity.from_json(want)
    assert back == IPIdentity(**{**entry.__dict__, "named_ports": tuple(sorted(
        entry.named_ports, key=lambda p: p.name))})


def test_a_cidr_entry_without_pod_omits_the_empty_fields() -> None:
    entry = IPIdentity(ip="192.0.2.0", identity=16777217, prefix_len=24)
    want = '{"IP":"192.0.2.0","Mask":"////AA==","HostIP":"","ID":16777217,"Key":0,"Metadata":""}'
    assert entry.to_json() == want
    assert IPIdentity.from_json(want) == entry


def test_a_pod_uid_a_writer_sets_is_kept() -> None:
    raw = '{"IP":"10.1.1.5","Mask":null,"HostIP":"","ID":65793,"Key":0,"Metadata":"","K8sPodUID":"u-1"}'
    entry = IPIdentity.from_json(raw)
    assert entry.pod_uid == "u-1" and IPIdentity.from_json(entry.to_json()) == entry


# ---- cilium/state/identities/v1/id/<id> and value/<labels>/<owner> -------------------
# pkg/identity/key (GlobalIdentity.GetKey: labels' SortedList, "source:key=value;" each) and
# pkg/kvstore/allocator (master key id/<id> -> key; slave key value/<key>/<node> -> id).
# The labels of a pod: pkg/k8s/utils GetPodMetadata (namespace, service account) and
# pkg/policy/api (io.cilium.k8s.namespace.labels.<key> for each namespace label).

IDENTITY_LABELS = ("k8s:app=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default;"
                   "k8s:io.cilium.k8s.namespace.labels.team=blue;k8s:io.cilium.k8s.policy.cluster=east;"
                   "k8s:io.cilium.k8s.policy.serviceaccount=web;k8s:io.kubernetes.pod.namespace=default;")


def test_identity_labels_are_the_ones_cilium_derives_for_a_pod() -> None:
    labels = identity_labels("east", "default", {"app": "web"}, service_account="web",
                             namespace_labels={"team": "blue"})
    assert format_labels(labels) == IDENTITY_LABELS
    assert parse_labels(IDENTITY_LABELS) == labels
    assert Identity(65536, labels).kv_key == "cilium/state/identities/v1/id/65536"
    # the index key is Cilium's slave key, not a digest only Plexus knows
    assert value_key(labels) == f"cilium/state/identities/v1/value/{IDENTITY_LABELS}/clustermesh-apiserver"
    assert legacy_value_key(labels).startswith("cilium/state/identities/v1/value/")
    # a pod that names no service account has Kubernetes' "default"
    assert "k8s:io.cilium.k8s.policy.serviceaccount=default" in identity_labels("east", "ns", {})


def test_an_endpoint_registration_carries_service_account_and_namespace_labels() -> None:
    reg = EndpointRegistration("10.1.1.5", "default", "web-1", {"app": "web"}, "n1", "172.31.1.11",
                               service_account="web", namespace_labels={"team": "blue"})
    assert EndpointRegistration.from_json(reg.to_json()) == reg
    older = ('{"ip": "10.1.1.5", "ipv6": null, "namespace": "default", "podName": "web-1", '
             '"labels": {}, "node": "n1", "hostIP": "172.31.1.11"}')
    assert EndpointRegistration.from_json(older).service_account == "default"


# ---- identity ranges: maxConnectedClusters 255 and 511 --------------------------------
# pkg/clustermesh/types/types.go: GetClusterIDShift = 24 - log2(max + 1).

def test_identity_ranges_follow_ciliums_cluster_shift() -> None:
    assert identity_range(1) == (1 << 16, (2 << 16) - 1)
    assert identity_range(300, 511) == (300 << 15, (301 << 15) - 1)
    assert identity_cluster_id(300 << 15 | 77, 511) == 300
    assert identity_cluster_id(3 << 16 | 77) == 3
    with pytest.raises(InvalidValue, match="maxConnectedClusters 1023"):
        identity_range(1, 1023)


# ---- cilium/state/services/v1/<cluster>/<ns>/<name> -----------------------------------
# pkg/clustermesh/store/store.go: ClusterService, PortConfiguration keyed by port *name*
# ("" when the port has none), L4Addr{Protocol, Port} of pkg/loadbalancer; hostnames and
# zones omitempty.

SERVICE = Service.model_validate({
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "echo", "namespace": "default",
                 "annotations": {"service.cilium.io/global": "true"}},
    "spec": {"clusterIP": "10.96.1.10", "selector": {"app": "echo"},
             "ports": [{"port": 80, "targetPort": 8080}]}})
SERVICE_BYTES = (
    '{"cluster":"east","namespace":"default","name":"echo",'
    '"frontends":{"10.96.1.10":{"":{"Protocol":"TCP","Port":80}}},'
    '"backends":{"10.1.1.5":{"":{"Protocol":"TCP","Port":8080}},'
    '"10.1.2.7":{"":{"Protocol":"TCP","Port":8080}}},'
    '"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":1}')


def test_a_global_service_with_an_unnamed_port_is_what_cilium_writes() -> None:
    server = ApiServer(kv=None, cluster="east", cluster_id=1)  # type: ignore[arg-type]
    eps = [EndpointRegistration(ip, "default", f"echo-{i}", {"app": "echo"}, "n1", "172.31.1.11")
           for i, ip in enumerate(("10.1.2.7", "10.1.1.5"))]
    svc = server._cluster_service(SERVICE, eps)
    assert svc.to_json() == SERVICE_BYTES
    assert ClusterService.from_json(SERVICE_BYTES) == svc


def test_named_ports_and_labels_are_written_sorted() -> None:
    svc = ClusterService("west", "default", "web",
                         frontends={"10.96.2.9": {"https": L4Addr("TCP", 443), "http": L4Addr("TCP", 80)}},
                         labels={"b": "2", "a": "1"}, cluster_id=2)
    assert svc.to_json() == (
        '{"cluster":"west","namespace":"default","name":"web","frontends":{"10.96.2.9":'
        '{"http":{"Protocol":"TCP","Port":80},"https":{"Protocol":"TCP","Port":443}}},'
        '"backends":{},"labels":{"a":"1","b":"2"},"selector":{},"includeExternal":true,'
        '"shared":true,"clusterID":2}')


def test_kubernetes_port_naming_rules_hold() -> None:
    spec = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "d"},
            "spec": {"ports": [{"port": 80}, {"port": 81}]}}
    with pytest.raises(ConfigError, match="every port needs a name"):
        parse(Service, spec, "svc.yaml")
    spec["spec"]["ports"] = [{"name": "a", "port": 80}, {"name": "a", "port": 81}]  # type: ignore[index]
    with pytest.raises(ConfigError, match="unique"):
        parse(Service, spec, "svc.yaml")


def _svc(cluster: str, frontends: dict[str, dict[str, L4Addr]],
         backends: dict[str, dict[str, L4Addr]]) -> ClusterService:
    return ClusterService(cluster, "default", "echo", frontends=frontends, backends=backends,
                          cluster_id={"east": 1, "west": 2}[cluster])


@pytest.mark.parametrize("remote_key", ["", "80"])  # Cilium's, and an older Plexus's
def test_merge_matches_backends_to_frontends_by_port_name(remote_key: str) -> None:
    """Cilium's rule (pkg/clustermesh/store PortConfiguration): a remote backend port belongs
    to the frontend port of the same name; an older Plexus's number key stands for ""."""
    local = _svc("east", {"10.96.1.10": {"": L4Addr("TCP", 80)}}, {"10.1.1.5": {"": L4Addr("TCP", 8080)}})
    remote = _svc("west", {"10.96.2.10": {remote_key: L4Addr("TCP", 80)}},
                  {"10.2.1.5": {remote_key: L4Addr("TCP", 8080)}})
    [merged] = merge([local, remote], "east")
    assert {(b.ip, b.ports[""].port) for b in merged.backends} == {("10.1.1.5", 8080), ("10.2.1.5", 8080)}
    # and the mirror image: an older Plexus cluster's own view finds Cilium's backends
    [theirs] = merge([_svc("east", local.frontends, local.backends),
                      _svc("west", {"10.96.2.10": {"80": L4Addr("TCP", 80)}}, {})], "west")
    assert {b.ip for b in theirs.backends if "80" in b.ports} == {"10.1.1.5"}


def test_merge_leaves_out_ports_of_another_name() -> None:
    local = _svc("east", {"10.96.1.10": {"http": L4Addr("TCP", 80)}}, {})
    remote = _svc("west", {}, {"10.2.1.5": {"grpc": L4Addr("TCP", 9000)}})
    [merged] = merge([local, remote], "east")
    assert [b.ports.get("http") for b in merged.backends] == [None]


# ---- cilium/synced/<cluster>/<prefix> -------------------------------------------------
# pkg/kvstore/store/syncstore.go handleSync: time.Now().Format(time.RFC3339), whole seconds
# (the heartbeat too: the operator's kvstore.HeartbeatPath writer).

def test_canary_time_is_gos_rfc3339() -> None:
    assert go_time(1_700_000_000.987) == "2023-11-14T22:13:20Z"
    assert go_time(0) == "1970-01-01T00:00:00Z"


def test_go_json_escapes_as_go_does() -> None:
    assert go_json({"a": "<&>\u2028é", "b": None}) == '{"a":"\\u003c\\u0026\\u003e\\u2028é","b":null}'


# ---- the clustermesh config file ------------------------------------------------------
# Cilium reads it as etcd's client YAML (go.etcd.io/etcd/client/v3/yaml, via pkg/kvstore):
# unknown keys are skipped by Go's decoder, a wrong type is an error, durations are
# nanoseconds (time.Duration from JSON).

def test_a_config_file_with_ciliums_keys_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "west"
    f.write_text("endpoints:\n- https://172.31.2.250:2379\n"
                 "trusted-ca-file: /var/lib/cilium/clustermesh/west.etcd-client-ca.crt\n"
                 "cert-file: /var/lib/cilium/clustermesh/west.etcd-client.crt\n"
                 "key-file: /var/lib/cilium/clustermesh/west.etcd-client.key\n"
                 "dial-timeout: 3000000000\nauto-sync-interval: 300000000000\n"
                 "dial-keep-alive-time: 30000000000\ninsecure-skip-tls-verify: false\n"
                 "cilium-host-aliases: [{ip: 172.31.2.250, hostnames: [west.mesh.cilium.io]}]\n"
                 "some-future-key: 1\n")
    cfg, ignored = read_remote_cluster_file(f)
    assert cfg.endpoints == ["https://172.31.2.250:2379"] and cfg.timeout == 3.0
    assert str(cfg.ca) == "/var/lib/cilium/clustermesh/west.etcd-client-ca.crt"
    assert ignored == ("auto-sync-interval", "cilium-host-aliases", "dial-keep-alive-time",
                       "insecure-skip-tls-verify", "some-future-key")


def test_etcds_older_ca_file_key_is_the_trusted_ca(tmp_path: Path) -> None:
    f = tmp_path / "west"
    f.write_text("endpoints: [https://a:2379]\nca-file: /ca.crt\n")
    assert str(read_remote_cluster_file(f)[0].ca) == "/ca.crt"


@pytest.mark.parametrize(("text", "why"), [
    ("trusted-ca-file: /ca.crt\n", "endpoints"),
    ("endpoints: [https://a:2379]\ndial-timeout: 5s\n", "dial-timeout"),
    ("endpoints: [https://a:2379]\nauto-sync-interval: 5m\n", "auto-sync-interval: expected an integer"),
    ("endpoints: [https://a:2379]\ninsecure-skip-tls-verify: 'yes'\n", "true or false"),
    ("endpoints: https://a:2379\n", "endpoints"),
])
def test_what_cilium_refuses_is_refused(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "west"
    f.write_text(text)
    with pytest.raises(ConfigError, match=why):
        read_remote_cluster_file(f)


# ---- `plexus clustermesh list global-services --cluster west` -------------------------

def test_a_merged_service_is_listed_for_the_clusters_of_its_backends() -> None:
    import dataclasses

    from clustermesh.module import _contributed_by

    local = _svc("east", {"10.96.1.10": {"": L4Addr("TCP", 80)}}, {"10.1.1.5": {"": L4Addr("TCP", 8080)}})
    remote = _svc("west", {}, {"10.2.1.5": {"": L4Addr("TCP", 8080)}})
    [merged] = merge([local, remote], "east")
    row = dataclasses.asdict(merged)
    assert _contributed_by(row, "west") and _contributed_by(row, "east")
    assert not _contributed_by(row, "north")
    assert _contributed_by(dataclasses.asdict(remote), "west")
    assert not _contributed_by(dataclasses.asdict(remote), "east")

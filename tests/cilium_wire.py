"""A stand-in for Cilium's clustermesh-apiserver: the keys and values it writes to its
cluster's etcd, built from templates of Cilium's shapes (the same bytes the unit tests in
tests/unit/test_cilium_wire.py spell out), not from Plexus's models.

Sources: pkg/clustermesh/types/types.go (cluster-config), pkg/node/types/node.go (nodes),
pkg/identity/identity.go (ip), pkg/kvstore/allocator (identities), pkg/clustermesh/store/
store.go (services), pkg/kvstore/store/syncstore.go (canaries)."""

from __future__ import annotations

import ipaddress
import json
import time
from base64 import b64encode

STATE = "cilium/state"
CANARY_PREFIXES = (f"{STATE}/nodes/v1", f"{STATE}/services/v1", f"{STATE}/identities/v1",
                   f"{STATE}/ip/v1", f"{STATE}/serviceexports/v1")


def _s(text: str) -> str:
    return json.dumps(text)  # plain ASCII strings: Go writes them the same


def _cidr(cidr: str) -> str:
    net = ipaddress.ip_network(cidr)
    return f'{{"IP":{_s(str(net.network_address))},"Mask":{_s(b64encode(net.netmask.packed).decode())}}}'


def _map(m: dict[str, str]) -> str:
    return "{" + ",".join(f"{_s(k)}:{_s(v)}" for k, v in sorted(m.items())) + "}" if m else "null"


def cluster_config(cluster_id: int) -> str:
    return (f'{{"id":{cluster_id},"capabilities":{{"syncedCanaries":true,'
            f'"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}')


def node(name: str, cluster: str, cluster_id: int, internal_ip: str, pod_cidr: str,
         wg_key: str, labels: dict[str, str]) -> str:
    annotations = {"network.cilium.io/wg-pub-key": wg_key} if wg_key else {}
    return (f'{{"Name":{_s(name)},"Cluster":{_s(cluster)},'
            f'"IPAddresses":[{{"Type":"InternalIP","IP":{_s(internal_ip)}}}],'
            f'"IPv4AllocCIDR":{_cidr(pod_cidr)},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,'
            f'"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"",'
            f'"IPv6IngressIP":"","ClusterID":{cluster_id},"Source":"custom-resource","EncryptionKey":0,'
            f'"Labels":{_map(labels)},"Annotations":{_map(annotations)},"WireguardPubKey":{_s(wg_key)},'
            f'"BootID":""}}')


def ip_pair(ip: str, identity: int, host_ip: str, namespace: str, pod: str) -> str:
    return (f'{{"IP":{_s(ip)},"Mask":null,"HostIP":{_s(host_ip)},"ID":{identity},"Key":0,'
            f'"Metadata":"","K8sNamespace":{_s(namespace)},"K8sPodName":{_s(pod)},'
            f'"K8sServiceAccount":"default"}}')


def pod_labels(cluster: str, namespace: str, labels: dict[str, str]) -> str:
    """The master key's value: every label of the pod Cilium derives, sorted."""
    all_labels = {**labels, "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": namespace,
                  "io.cilium.k8s.policy.cluster": cluster,
                  "io.cilium.k8s.policy.serviceaccount": "default",
                  "io.kubernetes.pod.namespace": namespace}
    return "".join(f"k8s:{k}={v};" for k, v in sorted(all_labels.items()))


def service(cluster: str, cluster_id: int, namespace: str, name: str, frontend: str, port: int,
            backends: dict[str, int], selector: dict[str, str]) -> str:
    """A global service with one unnamed TCP port: ports keyed by ""."""
    back = ",".join(f'{_s(ip)}:{{"":{{"Protocol":"TCP","Port":{p}}}}}' for ip, p in sorted(backends.items()))
    sel = _map(selector) if selector else "{}"
    return (f'{{"cluster":{_s(cluster)},"namespace":{_s(namespace)},"name":{_s(name)},'
            f'"frontends":{{{_s(frontend)}:{{"":{{"Protocol":"TCP","Port":{port}}}}}}},'
            f'"backends":{{{back}}},"labels":{{}},"selector":{sel},"includeExternal":true,'
            f'"shared":true,"clusterID":{cluster_id}}}')


def now() -> str:
    """time.Now().Format(time.RFC3339) in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

"""The shared state, in Cilium's kvstore layout and JSON field names.

Every `from_json` validates: a hostile or malformed value raises `InvalidValue` with a
message naming the field; the caller skips and counts it and carries on.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import itertools
import json
import operator
import re
import socket
from dataclasses import dataclass, field
from typing import Any

PREFIX = "cilium"
HEARTBEAT_KEY = f"{PREFIX}/.heartbeat"
CLUSTER_CONFIG_PREFIX = f"{PREFIX}/cluster-config"
SYNCED_PREFIX = f"{PREFIX}/synced"
NODES_PREFIX = f"{PREFIX}/state/nodes/v1"
SERVICES_PREFIX = f"{PREFIX}/state/services/v1"
IPCACHE_PREFIX = f"{PREFIX}/state/ip/v1/default"
IDENTITIES_PREFIX = f"{PREFIX}/state/identities/v1/id"
IDENTITY_VALUES_PREFIX = f"{PREFIX}/state/identities/v1/value"
SERVICE_EXPORTS_PREFIX = f"{PREFIX}/state/serviceexports/v1"
# KVStoreMesh's copy of every remote cluster in the local etcd (Cilium's
# kvstore.StateToCachePrefix: "state" becomes "cache", then the cluster's name).
CACHE_PREFIX = f"{PREFIX}/cache"
# Plexus-only objects (BGP, egress, VM registrations, policies) follow the same habits.
PLEXUS_PREFIX = "plexus"

CLUSTER_NAME_RE = re.compile(r"^([a-z0-9][-a-z0-9]*)?[a-z0-9]$")
CLUSTER_NAME_MAX = 32
CLUSTER_ID_MIN, CLUSTER_ID_MAX = 1, 255
# Cilium's two supported mesh sizes (pkg/clustermesh/types/types.go): a numeric identity
# has 24 bits; 255 clusters leave 16 bits per cluster, 511 leave 15.
MAX_CONNECTED_CLUSTERS = (255, 511)
IDENTITY_BITS = 24
# What Cilium's clustermesh-apiserver sets as Source of the nodes it publishes: it reads
# them from CiliumNode resources (pkg/source/source.go, pkg/node/types ParseCiliumNode).
NODE_SOURCE = "custom-resource"
ANNOTATION_WG_PUB_KEY = "network.cilium.io/wg-pub-key"  # Cilium's pkg/annotation

# Reserved numeric identities, as in Cilium.
ID_UNKNOWN = 0
ID_HOST = 1
ID_WORLD = 2
ID_UNMANAGED = 3
ID_HEALTH = 4
ID_INIT = 5
ID_REMOTE_NODE = 6
ID_KUBE_APISERVER = 7
ID_INGRESS = 8
ID_WORLD_IPV4 = 9
ID_WORLD_IPV6 = 10
RESERVED_IDENTITIES = {
    ID_HOST: "reserved:host",
    ID_WORLD: "reserved:world",
    ID_UNMANAGED: "reserved:unmanaged",
    ID_HEALTH: "reserved:health",
    ID_INIT: "reserved:init",
    ID_REMOTE_NODE: "reserved:remote-node",
    ID_KUBE_APISERVER: "reserved:kube-apiserver",
    ID_INGRESS: "reserved:ingress",
    ID_WORLD_IPV4: "reserved:world-ipv4",
    ID_WORLD_IPV6: "reserved:world-ipv6",
}

LABEL_CLUSTER = "io.cilium.k8s.policy.cluster"
# What a Service manifest says beyond Cilium's service record, carried as its labels.
SERVICE_LABEL_LB_IP = "plexus.io/load-balancer-ip"            # comma-separated addresses
SERVICE_LABEL_EXTERNAL_IPS = "plexus.io/external-ips"         # comma-separated addresses
SERVICE_LABEL_TRAFFIC_POLICY = "plexus.io/external-traffic-policy"  # Local or Cluster
LABEL_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_SERVICE_ACCOUNT = "io.cilium.k8s.policy.serviceaccount"
LABEL_NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels"  # + ".<key>" per namespace label
LABEL_NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
DEFAULT_SERVICE_ACCOUNT = "default"  # what Kubernetes gives a pod that names none


class InvalidValue(ValueError):
    """A kvstore key or value that must be skipped."""


# ---- names and ranges -----------------------------------------------------------------

def check_cluster_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidValue("cluster name must be a non-empty string")
    if len(name) > CLUSTER_NAME_MAX:
        raise InvalidValue(f"cluster name {name!r} is longer than {CLUSTER_NAME_MAX} characters")
    if not CLUSTER_NAME_RE.match(name):
        raise InvalidValue(
            f"cluster name {name!r} must be lower-case alphanumerics and '-', "
            "starting and ending with an alphanumeric")
    return name


def check_cluster_id(cluster_id: Any, max_connected: int = CLUSTER_ID_MAX) -> int:
    if not isinstance(cluster_id, int) or isinstance(cluster_id, bool):
        raise InvalidValue(f"cluster id must be an integer, got {cluster_id!r}")
    if not CLUSTER_ID_MIN <= cluster_id <= max_connected:
        raise InvalidValue(f"cluster id {cluster_id} is outside {CLUSTER_ID_MIN}..{max_connected}")
    return cluster_id


def cluster_id_shift(max_connected: int = CLUSTER_ID_MAX) -> int:
    """Where the cluster id starts in a numeric identity: 16 for 255 clusters, 15 for 511."""
    if max_connected not in MAX_CONNECTED_CLUSTERS:
        raise InvalidValue(f"maxConnectedClusters {max_connected} is not one of "
                           f"{', '.join(map(str, MAX_CONNECTED_CLUSTERS))}")
    return IDENTITY_BITS - (max_connected + 1).bit_length() + 1


def identity_range(cluster_id: int, max_connected: int = CLUSTER_ID_MAX) -> tuple[int, int]:
    """The identities a cluster may allocate: [id<<shift, ((id+1)<<shift)-1]."""
    shift = cluster_id_shift(max_connected)
    return cluster_id << shift, ((cluster_id + 1) << shift) - 1


def identity_cluster_id(identity: int, max_connected: int = CLUSTER_ID_MAX) -> int:
    return (identity >> cluster_id_shift(max_connected)) & max_connected


# ---- Go's encoding/json ---------------------------------------------------------------

# json.Marshal escapes these inside strings (HTML safety, JavaScript line separators).
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})


def go_json(value: Any) -> str:
    """`value` as Go's json.Marshal writes it: compact, UTF-8, Go's escapes.

    Struct fields keep the order the dict was built in (struct-field order); Go maps are
    written with sorted keys, so callers pass maps through `go_map`."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_GO_ESCAPES)


def go_map(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Go map: keys sorted; an empty one written as null, as a nil map is."""
    return dict(sorted(value.items())) if value else None


def go_time(seconds: float) -> str:
    """A time as Go's `time.Now().Format(time.RFC3339)` writes it where the zone is UTC:
    whole seconds, `Z`."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Bounds checked before a value is decoded: a remote's value must not be able to exhaust
# memory or the decoder's recursion. Real values are a few hundred bytes, a handful deep.
MAX_VALUE_BYTES = 1 << 20
MAX_JSON_DEPTH = 64

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN_AS_2_CLOSE_AS_0 = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth(raw: bytes) -> int:
    """How deep UTF-8 JSON's arrays and objects nest, without decoding it (strings skipped).

    Counting stops mattering at a stray closer: a decoder fails there before going on."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    # An opener adds one level, a closer removes one: the depth after k brackets is the sum
    # of (2 or 0) - 1 over them; all in C, no Python loop per byte.
    steps = itertools.accumulate(brackets.translate(_OPEN_AS_2_CLOSE_AS_0))
    return max(0, int(max(map(operator.sub, steps, itertools.count(1)))))


def check_bounds(raw: bytes | str, what: str) -> bytes:
    """`raw` as bytes, or InvalidValue when it is too large or nests too deep to decode."""
    data = raw.encode(errors="surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidValue(f"{what}: value of {len(data)} bytes is over the {MAX_VALUE_BYTES} byte limit")
    # every opener counted, in strings too: when even that is within the limit, no scan
    if data.count(b"{") + data.count(b"[") <= MAX_JSON_DEPTH:
        return data
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise InvalidValue(f"{what}: value nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
    return data


def decode_json(raw: bytes | str, what: str) -> Any:
    """The one way a kvstore value is decoded: bounded first, then parsed; InvalidValue if bad."""
    data = check_bounds(raw, what)
    try:
        # UTF-8 only: json.loads would guess UTF-16 or -32 from bytes, where the scan of
        # check_bounds would no longer see every string's end.
        text = data.decode()
    except UnicodeDecodeError as e:
        raise InvalidValue(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidValue(f"{what}: malformed JSON: {e}") from None



def _want(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, *,
          required: bool = True, default: Any = None) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise InvalidValue(f"{what}: field {name} is missing")
        return default
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidValue(f"{what}: field {name} has the wrong type ({type(value).__name__})")
    return value


def canonical_ipv4(value: str) -> bool:
    """Whether `value` is an IPv4 address written as `str(ipaddress.ip_address)` would
    write it: checked in C, as the ipcache holds one per entry (anything else, IPv6
    included, takes the ipaddress path)."""
    try:
        return socket.inet_ntoa(socket.inet_pton(socket.AF_INET, value)) == value
    except (OSError, ValueError, TypeError):
        return False


def _ip(value: str, what: str) -> str:
    if canonical_ipv4(value):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidValue(f"{what}: {value!r} is not an IP address") from None


def _string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidValue(f"{what}: expected a map of strings")
    return dict(value)


# Go marshals net.IPNet as {"IP": "10.1.1.0", "Mask": "<base64>"}.
def cidr_to_go(cidr: str | None) -> dict[str, str] | None:
    if not cidr:
        return None
    net = ipaddress.ip_network(cidr, strict=False)
    return {"IP": str(net.network_address), "Mask": base64.b64encode(net.netmask.packed).decode()}


def cidr_from_go(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return str(ipaddress.ip_network(value, strict=False))
        if (isinstance(value, dict) and isinstance(value.get("IP"), str)
                and isinstance(value.get("Mask"), str)):
            mask = base64.b64decode(value["Mask"], validate=True)
            prefix = bin(int.from_bytes(mask, "big")).count("1")
            return str(ipaddress.ip_network(f"{value['IP']}/{prefix}", strict=False))
    except (ValueError, TypeError):
        pass
    raise InvalidValue(f"{what}: malformed CIDR {value!r}")


# ---- cluster config -------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterConfig:
    """`cilium/cluster-config/<cluster>`: CiliumClusterConfig of Cilium's
    pkg/clustermesh/types/types.go; every field `omitempty`."""

    id: int
    synced_canaries: bool = True
    max_connected_clusters: int = 255
    cached: bool = False
    # MCS-API ServiceExports: None says the cluster does not know of them at all.
    service_exports_enabled: bool | None = False

    def to_json(self) -> str:
        caps: dict[str, Any] = {}
        if self.synced_canaries:
            caps["syncedCanaries"] = True
        if self.cached:
            caps["cached"] = True
        if self.max_connected_clusters:
            caps["maxConnectedClusters"] = self.max_connected_clusters
        if self.service_exports_enabled is not None:
            caps["serviceExportsEnabled"] = self.service_exports_enabled
        out: dict[str, Any] = {"id": self.id} if self.id else {}
        out["capabilities"] = caps  # a struct: omitempty never drops it
        return go_json(out)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ClusterConfig:
        what = "cluster-config"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        caps = obj.get("capabilities") or {}
        if not isinstance(caps, dict):
            raise InvalidValue(f"{what}: capabilities must be an object")
        # Absent or 0 means Cilium's default (pkg/clustermesh/types configuredMaxConnectedClusters).
        max_connected = _want(caps, "maxConnectedClusters", int, what, required=False, default=0) or 255
        cluster_id = check_cluster_id(obj.get("id"), max(max_connected, CLUSTER_ID_MAX))
        exports = caps.get("serviceExportsEnabled")
        return cls(id=cluster_id, synced_canaries=bool(caps.get("syncedCanaries", False)),
                   max_connected_clusters=max_connected, cached=bool(caps.get("cached", False)),
                   service_exports_enabled=exports if isinstance(exports, bool) else None)


# ---- nodes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeAddress:
    type: str  # InternalIP, ExternalIP, CiliumInternalIP
    ip: str


# The fields of Cilium's Node (pkg/node/types/node.go), in struct order; none has a json tag,
# so every one is written, nil ones as null and an unset net.IP as "".
NODE_FIELDS = ("Name", "Cluster", "IPAddresses", "IPv4AllocCIDR", "IPv4SecondaryAllocCIDRs",
               "IPv6AllocCIDR", "IPv6SecondaryAllocCIDRs", "IPv4HealthIP", "IPv6HealthIP",
               "IPv4IngressIP", "IPv6IngressIP", "ClusterID", "Source", "EncryptionKey", "Labels",
               "Annotations", "WireguardPubKey", "BootID")


@dataclass(frozen=True)
class Node:
    """`cilium/state/nodes/v1/<cluster>/<name>`."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...] = ()
    ipv4_alloc_cidr: str | None = None
    ipv6_alloc_cidr: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    wireguard_pubkey: str = ""
    source: str = NODE_SOURCE
    secondary_alloc_cidrs: tuple[str, ...] = ()  # IPv4/IPv6SecondaryAllocCIDRs
    ipv4_health_ip: str = ""
    ipv6_health_ip: str = ""
    ipv4_ingress_ip: str = ""
    ipv6_ingress_ip: str = ""
    encryption_key: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    boot_id: str = ""
    # Fields of a value this Plexus does not know (a newer Cilium's), written back as read.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.cluster, self.name)

    @property
    def kv_key(self) -> str:
        return f"{NODES_PREFIX}/{self.cluster}/{self.name}"

    def internal_ip(self) -> str | None:
        for a in self.addresses:
            if a.type == "InternalIP":
                return a.ip
        return self.addresses[0].ip if self.addresses else None

    def to_json(self) -> str:
        v4 = [c for c in self.secondary_alloc_cidrs if ":" not in c]
        v6 = [c for c in self.secondary_alloc_cidrs if ":" in c]
        annotations = dict(self.annotations)
        if self.wireguard_pubkey:  # Cilium carries the key in both places
            annotations.setdefault(ANNOTATION_WG_PUB_KEY, self.wireguard_pubkey)
        out: dict[str, Any] = {
            "Name": self.name,
            "Cluster": self.cluster,
            "IPAddresses": [{"Type": a.type, "IP": a.ip} for a in self.addresses] or None,
            "IPv4AllocCIDR": cidr_to_go(self.ipv4_alloc_cidr),
            "IPv4SecondaryAllocCIDRs": [cidr_to_go(c) for c in v4] or None,
            "IPv6AllocCIDR": cidr_to_go(self.ipv6_alloc_cidr),
            "IPv6SecondaryAllocCIDRs": [cidr_to_go(c) for c in v6] or None,
            "IPv4HealthIP": self.ipv4_health_ip,
            "IPv6HealthIP": self.ipv6_health_ip,
            "IPv4IngressIP": self.ipv4_ingress_ip,
            "IPv6IngressIP": self.ipv6_ingress_ip,
            "ClusterID": self.cluster_id,
            "Source": self.source,
            "EncryptionKey": self.encryption_key,
            "Labels": go_map(self.labels),
            "Annotations": go_map(annotations),
            "WireguardPubKey": self.wireguard_pubkey,
            "BootID": self.boot_id,
        }
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return go_json(out)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Node:
        what = "node"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        name = _want(obj, "Name", str, what)
        what = f"node {name!r}"
        addrs = []
        for a in _want(obj, "IPAddresses", list, what, required=False, default=[]):
            if not isinstance(a, dict):
                raise InvalidValue(f"{what}: IPAddresses entries must be objects")
            addrs.append(NodeAddress(type=_want(a, "Type", str, what),
                                     ip=_ip(_want(a, "IP", str, what), what)))
        pubkey = _want(obj, "WireguardPubKey", str, what, required=False, default="")
        encryption_key = _want(obj, "EncryptionKey", int, what, required=False, default=0)
        if not 0 <= encryption_key <= 255:
            raise InvalidValue(f"{what}: EncryptionKey {encryption_key} is not a uint8")
        return cls(
            name=name,
            cluster=check_cluster_name(_want(obj, "Cluster", str, what)),
            cluster_id=_want(obj, "ClusterID", int, what, required=False, default=0),
            addresses=tuple(addrs),
            ipv4_alloc_cidr=cidr_from_go(obj.get("IPv4AllocCIDR"), what),
            ipv6_alloc_cidr=cidr_from_go(obj.get("IPv6AllocCIDR"), what),
            labels=_string_map(obj.get("Labels"), f"{what}: Labels"),
            wireguard_pubkey=pubkey,
            source=_want(obj, "Source", str, what, required=False, default=""),
            secondary_alloc_cidrs=_secondary_cidrs_from_go(obj, what),
            ipv4_health_ip=_optional_ip(obj, "IPv4HealthIP", what),
            ipv6_health_ip=_optional_ip(obj, "IPv6HealthIP", what),
            ipv4_ingress_ip=_optional_ip(obj, "IPv4IngressIP", what),
            ipv6_ingress_ip=_optional_ip(obj, "IPv6IngressIP", what),
            encryption_key=encryption_key,
            annotations=_string_map(obj.get("Annotations"), f"{what}: Annotations"),
            boot_id=_want(obj, "BootID", str, what, required=False, default=""),
            extra={k: v for k, v in obj.items() if k not in NODE_FIELDS},
        )


def _optional_ip(obj: dict[str, Any], name: str, what: str) -> str:
    value = _want(obj, name, str, what, required=False, default="")
    return _ip(value, f"{what}: {name}") if value else ""


def _secondary_cidrs_from_go(obj: dict[str, Any], what: str) -> tuple[str, ...]:
    out = []
    for family in ("IPv4", "IPv6"):
        field_name = f"{family}SecondaryAllocCIDRs"
        for c in _want(obj, field_name, list, what, required=False, default=[]) or []:
            cidr = cidr_from_go(c, f"{what}: {field_name}")
            if cidr is not None:
                out.append(cidr)
    return tuple(out)


# ---- endpoints: IP -> identity --------------------------------------------------------

@dataclass(frozen=True)
class NamedPort:
    name: str
    port: int
    protocol: str


# the optional string fields of an IPIdentityPair, in IPIdentity's order
_IP_STRINGS = ("K8sNamespace", "K8sPodName", "K8sServiceAccount", "Metadata", "K8sPodUID")


@dataclass(frozen=True)
class IPIdentity:
    """`cilium/state/ip/v1/default/<ip>`: an endpoint's IP and its security identity."""

    ip: str
    identity: int
    host_ip: str = ""
    prefix_len: int | None = None  # None: a host address (/32 or /128)
    encrypt_key: int = 0
    namespace: str = ""
    pod_name: str = ""
    named_ports: tuple[NamedPort, ...] = ()
    cluster: str = ""  # the cluster it was learned from; not part of the value
    service_account: str = ""
    metadata: str = ""
    pod_uid: str = ""  # kept when a writer sets it; nothing here knows a pod's UID

    @functools.cached_property  # read many times per entry by the ipcache merge
    def prefix(self) -> str:
        if self.prefix_len is None and canonical_ipv4(self.ip):
            return f"{self.ip}/32"
        addr = ipaddress.ip_address(self.ip)
        length = self.prefix_len if self.prefix_len is not None else addr.max_prefixlen
        return f"{addr}/{length}"

    @property
    def kv_key(self) -> str:
        return f"{IPCACHE_PREFIX}/{self.ip}"

    def to_json(self) -> str:
        """IPIdentityPair of Cilium's pkg/identity/identity.go, in its field order."""
        mask = None
        if self.prefix_len is not None:
            net = ipaddress.ip_network(self.prefix, strict=False)
            mask = base64.b64encode(net.netmask.packed).decode()
        out: dict[str, Any] = {
            "IP": self.ip, "Mask": mask, "HostIP": self.host_ip, "ID": self.identity,
            "Key": self.encrypt_key, "Metadata": self.metadata}
        for name, value in (("K8sNamespace", self.namespace), ("K8sPodName", self.pod_name),
                            ("K8sServiceAccount", self.service_account)):
            if value:  # omitempty
                out[name] = value
        if self.named_ports:
            out["NamedPorts"] = [{"Name": p.name, "Port": p.port, "Protocol": p.protocol}
                                 for p in sorted(self.named_ports, key=lambda p: p.name)]
        if self.pod_uid:
            out["K8sPodUID"] = self.pod_uid
        return go_json(out)

    @classmethod
    def from_json(cls, raw: bytes | str, cluster: str = "") -> IPIdentity:
        what = "ip"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        ip = _ip(_want(obj, "IP", str, what), what)
        what = f"ip {ip}"
        identity = _want(obj, "ID", int, what)
        if not 0 <= identity <= 0xFFFFFFFF:
            raise InvalidValue(f"{what}: identity {identity} out of range")
        prefix_len = None
        mask = obj.get("Mask")
        if mask:
            try:
                prefix_len = bin(int.from_bytes(base64.b64decode(mask, validate=True), "big")).count("1")
            except (ValueError, TypeError):
                raise InvalidValue(f"{what}: malformed Mask") from None
            if prefix_len > ipaddress.ip_address(ip).max_prefixlen:
                raise InvalidValue(f"{what}: Mask is longer than the address")
        host_ip = _want(obj, "HostIP", str, what, required=False, default="")
        if host_ip:
            host_ip = _ip(host_ip, what)
        ports = []
        for p in _want(obj, "NamedPorts", list, what, required=False, default=[]):
            if not isinstance(p, dict):
                raise InvalidValue(f"{what}: NamedPorts entries must be objects")
            ports.append(NamedPort(_want(p, "Name", str, what), _want(p, "Port", int, what),
                                   _want(p, "Protocol", str, what, required=False, default="TCP")))
        key = obj.get("Key")
        if key is not None and (type(key) is not int):
            _want(obj, "Key", int, what)  # the error it names
        strings = [obj.get(name) for name in _IP_STRINGS]
        if not all(v is None or type(v) is str for v in strings):  # one check for the usual case
            strings = [_want(obj, name, str, what, required=False, default="") for name in _IP_STRINGS]
        namespace, pod_name, service_account, metadata, pod_uid = (v or "" for v in strings)
        return cls(
            ip=ip, identity=identity, host_ip=host_ip, prefix_len=prefix_len, encrypt_key=key or 0,
            namespace=namespace, pod_name=pod_name, named_ports=tuple(ports), cluster=cluster,
            service_account=service_account, metadata=metadata, pod_uid=pod_uid,
        )


# ---- identities -----------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """`cilium/state/identities/v1/id/<id>` -> sorted label string."""

    id: int
    labels: tuple[str, ...]  # sorted, source-prefixed: "k8s:app=web"
    cluster: str = ""

    @property
    def kv_key(self) -> str:
        return f"{IDENTITIES_PREFIX}/{self.id}"

    def label_string(self) -> str:
        return format_labels(self.labels)

    def label_map(self) -> dict[str, str]:
        """Labels without their source prefix, as selectors see them."""
        out = {}
        for lbl in self.labels:
            _, _, kv = lbl.partition(":")
            k, _, v = kv.partition("=")
            out[k] = v
        return out


def format_labels(labels: tuple[str, ...] | list[str]) -> str:
    return "".join(f"{lbl};" for lbl in sorted(labels))


def parse_labels(raw: bytes | str, what: str = "identity") -> tuple[str, ...]:
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidValue(f"{what}: value of {len(raw)} bytes is over the {MAX_VALUE_BYTES} byte limit")
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InvalidValue(f"{what}: labels are not UTF-8: {e.reason} at byte {e.start}") from None
    if any(ord(c) < 0x20 for c in text):
        raise InvalidValue(f"{what}: labels contain control characters")
    parts = [p for p in text.split(";") if p]
    for p in parts:
        source, sep, kv = p.partition(":")
        if not sep or not source or not kv or kv.startswith("="):
            raise InvalidValue(f"{what}: malformed label {p!r}")
    return tuple(sorted(parts))


def identity_labels(cluster: str, namespace: str, labels: dict[str, str], *,
                    service_account: str = DEFAULT_SERVICE_ACCOUNT,
                    namespace_labels: dict[str, str] | None = None) -> tuple[str, ...]:
    """The label set an endpoint's identity is allocated from, with the labels Cilium
    derives for a pod (pkg/k8s/utils GetPodMetadata and pkg/policy/api's namespace
    labels): its namespace, service account and the labels of its namespace, where
    Kubernetes always sets `kubernetes.io/metadata.name`."""
    out = {f"k8s:{k}={v}" for k, v in labels.items()}
    out.add(f"k8s:{LABEL_CLUSTER}={cluster}")
    if namespace:
        out.add(f"k8s:{LABEL_NAMESPACE}={namespace}")
        ns_labels = {LABEL_NAMESPACE_NAME: namespace, **(namespace_labels or {})}
        out.update(f"k8s:{LABEL_NAMESPACE_LABELS}.{k}={v}" for k, v in ns_labels.items())
        if service_account:
            out.add(f"k8s:{LABEL_SERVICE_ACCOUNT}={service_account}")
    return tuple(sorted(out))


# ---- services -------------------------------------------------------------------------

@dataclass(frozen=True)
class L4Addr:
    protocol: str  # TCP, UDP, SCTP
    port: int


@dataclass(frozen=True)
class ClusterService:
    """`cilium/state/services/v1/<cluster>/<namespace>/<name>`."""

    cluster: str
    namespace: str
    name: str
    frontends: dict[str, dict[str, L4Addr]] = field(default_factory=dict)  # ip -> port name -> addr
    backends: dict[str, dict[str, L4Addr]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    selector: dict[str, str] = field(default_factory=dict)
    include_external: bool = True
    shared: bool = True
    cluster_id: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.cluster, self.namespace, self.name)

    @property
    def kv_key(self) -> str:
        return f"{SERVICES_PREFIX}/{self.cluster}/{self.namespace}/{self.name}"

    def to_json(self) -> str:
        """Cilium's pkg/clustermesh/store ClusterService: maps with sorted keys, ports keyed
        by port name ("" for an unnamed one), L4Addr as {"Protocol","Port"}."""
        def ports(m: dict[str, dict[str, L4Addr]]) -> dict[str, Any]:
            return {ip: {n: {"Protocol": a.protocol, "Port": a.port} for n, a in sorted(pm.items())}
                    for ip, pm in sorted(m.items())}
        return go_json({
            "cluster": self.cluster, "namespace": self.namespace, "name": self.name,
            "frontends": ports(self.frontends), "backends": ports(self.backends),
            "labels": dict(sorted(self.labels.items())),
            "selector": dict(sorted(self.selector.items())),
            "includeExternal": self.include_external, "shared": self.shared,
            "clusterID": self.cluster_id,
        })

    @classmethod
    def from_json(cls, raw: bytes | str) -> ClusterService:
        what = "service"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        ns = _want(obj, "namespace", str, what)
        name = _want(obj, "name", str, what)
        what = f"service {ns}/{name}"

        def ports(value: Any, field_name: str) -> dict[str, dict[str, L4Addr]]:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise InvalidValue(f"{what}: {field_name} must be an object")
            out: dict[str, dict[str, L4Addr]] = {}
            for ip, pm in value.items():
                ip = _ip(ip, f"{what}: {field_name}")
                if not isinstance(pm, dict):
                    raise InvalidValue(f"{what}: {field_name}[{ip}] must be an object")
                out[ip] = {}
                for pname, addr in pm.items():
                    if not isinstance(addr, dict):
                        raise InvalidValue(f"{what}: {field_name}[{ip}][{pname}] must be an object")
                    port = _want(addr, "Port", int, what)
                    proto = _want(addr, "Protocol", str, what, required=False, default="TCP")
                    if not 0 < port < 65536 or proto not in ("TCP", "UDP", "SCTP", "ANY"):
                        raise InvalidValue(f"{what}: {field_name}[{ip}][{pname}] bad port/protocol")
                    out[ip][pname] = L4Addr(proto, port)
            return out

        return cls(
            cluster=check_cluster_name(_want(obj, "cluster", str, what)),
            namespace=ns, name=name,
            frontends=ports(obj.get("frontends"), "frontends"),
            backends=ports(obj.get("backends"), "backends"),
            labels=_string_map(obj.get("labels"), f"{what}: labels"),
            selector=_string_map(obj.get("selector"), f"{what}: selector"),
            include_external=bool(obj.get("includeExternal", True)),
            shared=bool(obj.get("shared", True)),
            cluster_id=_want(obj, "clusterID", int, what, required=False, default=0),
        )


# ---- registrations: what agents tell their cluster's apiserver ------------------------

REGISTRATIONS_PREFIX = f"{PLEXUS_PREFIX}/registrations/v1"


def node_registration_key(cluster: str, node: str) -> str:
    return f"{REGISTRATIONS_PREFIX}/{cluster}/nodes/{node}"


def endpoint_registration_key(cluster: str, node: str, container_id: str) -> str:
    return f"{REGISTRATIONS_PREFIX}/{cluster}/endpoints/{node}/{container_id}"


@dataclass(frozen=True)
class EndpointRegistration:
    ip: str
    namespace: str
    pod_name: str
    labels: dict[str, str]
    node: str
    host_ip: str
    ipv6: str | None = None
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return go_json({"ip": self.ip, "ipv6": self.ipv6, "namespace": self.namespace,
                        "podName": self.pod_name, "labels": self.labels, "node": self.node,
                        "hostIP": self.host_ip, "serviceAccount": self.service_account,
                        "namespaceLabels": self.namespace_labels})

    @classmethod
    def from_json(cls, raw: bytes | str) -> EndpointRegistration:
        what = "endpoint registration"
        obj = decode_json(raw, what)
        if not isinstance(obj, dict):
            raise InvalidValue(f"{what}: expected an object")
        ipv6 = obj.get("ipv6")
        return cls(
            ip=_ip(_want(obj, "ip", str, what), what),
            namespace=_want(obj, "namespace", str, what),
            pod_name=_want(obj, "podName", str, what),
            labels=_string_map(obj.get("labels"), f"{what}: labels"),
            node=_want(obj, "node", str, what),
            host_ip=_ip(_want(obj, "hostIP", str, what), what),
            ipv6=_ip(ipv6, what) if isinstance(ipv6, str) and ipv6 else None,
            service_account=_want(obj, "serviceAccount", str, what, required=False,
                                  default=DEFAULT_SERVICE_ACCOUNT),
            namespace_labels=_string_map(obj.get("namespaceLabels"), f"{what}: namespaceLabels"),
        )


def synced_key(cluster: str, prefix: str) -> str:
    return f"{SYNCED_PREFIX}/{cluster}/{prefix}"


# The canaries a reader waits for (what Cilium and older Plexus both write) ...
SYNCED_PREFIXES = (NODES_PREFIX, SERVICES_PREFIX, IDENTITIES_PREFIX.rsplit("/", 1)[0],
                   IPCACHE_PREFIX.rsplit("/", 1)[0])
# ... and those the apiserver writes: Cilium's also says its (empty) service exports are
# synced, even with MCS-API off (clustermesh-apiserver's clustermesh/root.go).
WRITTEN_CANARIES = (*SYNCED_PREFIXES, SERVICE_EXPORTS_PREFIX)
# The canaries KVStoreMesh writes under cilium/synced/<remote>/ once it has copied a kind.
CACHED_SYNCED_PREFIXES = tuple(p.replace(f"{PREFIX}/state/", f"{CACHE_PREFIX}/", 1) for p in SYNCED_PREFIXES)


def cache_layout(cluster: str) -> dict[str, str]:
    """Where KVStoreMesh copies each prefix of a remote cluster's etcd: the prefix there ->
    the prefix in the local etcd (Cilium's pkg/clustermesh/kvstoremesh reflectors)."""
    return {
        f"{NODES_PREFIX}/{cluster}/": f"{CACHE_PREFIX}/nodes/v1/{cluster}/",
        f"{IPCACHE_PREFIX}/": f"{CACHE_PREFIX}/ip/v1/{cluster}/",
        f"{IDENTITIES_PREFIX}/": f"{CACHE_PREFIX}/identities/v1/{cluster}/id/",
        f"{SERVICES_PREFIX}/{cluster}/": f"{CACHE_PREFIX}/services/v1/{cluster}/",
    }

"""BGP manifests, modelled on Cilium's BGP control plane v2.

Kinds: BGPClusterConfig (which nodes speak BGP, their instances and peers), BGPPeerConfig
(transport, timers, multihop, MD5, graceful restart, families selecting advertisements),
BGPAdvertisement (what to announce, with which communities and local preference) and
BGPNodeConfigOverride (per-node router ID, ASN, local address). Every value that ends up in
ExaBGP's config or API is validated here into a typed value.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from plexus.core.config import Strict
from plexus.core.manifests import Metadata, Name
from plexus.core.selectors import LabelSelector

API_VERSION = "plexus.io/v1"
ASN = Annotated[int, Field(ge=1, le=4294967295)]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
WELL_KNOWN = {
    "no-export": (65535, 65281),
    "no-advertise": (65535, 65282),
    "no-export-subconfed": (65535, 65283),
    "no-peer": (65535, 65284),
    "blackhole": (65535, 666),
    "graceful-shutdown": (65535, 0),
    "accept-own": (65535, 1),
    "llgr-stale": (65535, 6),
    "no-llgr": (65535, 7),
}


def standard_community(v: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,5}):(\d{1,5})", v)
    if not m or int(m[1]) > 65535 or int(m[2]) > 65535:
        raise ValueError(f"{v!r} is not a standard community 'a:b' with a, b in 0..65535")
    return int(m[1]), int(m[2])


def large_community(v: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d{1,10}):(\d{1,10}):(\d{1,10})", v)
    if not m or any(int(x) > 4294967295 for x in m.groups()):
        raise ValueError(f"{v!r} is not a large community 'a:b:c' with a, b, c in 0..4294967295")
    return int(m[1]), int(m[2]), int(m[3])


def _check_standard(v: str) -> str:
    standard_community(v)
    return v


def _check_large(v: str) -> str:
    large_community(v)
    return v


# ---- BGPClusterConfig --------------------------------------------------------------------

class PeerConfigRef(Strict):
    name: Name


class ClusterPeer(Strict):
    name: Name
    peer_address: IPAddress
    peer_asn: ASN = Field(alias="peerASN")
    peer_config_ref: PeerConfigRef | None = None


class Instance(Strict):
    name: Name
    local_asn: ASN = Field(alias="localASN")
    router_id: ipaddress.IPv4Address | None = Field(None, alias="routerID")
    peers: list[ClusterPeer] = []

    @model_validator(mode="after")
    def _unique_peers(self) -> Instance:
        seen: set[IPAddress] = set()
        for p in self.peers:
            if p.peer_address in seen:
                raise ValueError(f"peer address {p.peer_address} appears twice")
            seen.add(p.peer_address)
        return self


class ClusterConfigSpec(Strict):
    node_selector: LabelSelector | None = None
    bgp_instances: list[Instance] = Field(min_length=1)


class BGPClusterConfig(Strict):
    api_version: Literal["plexus.io/v1"]
    kind: Literal["BGPClusterConfig"]
    metadata: Metadata
    spec: ClusterConfigSpec


# ---- BGPPeerConfig -----------------------------------------------------------------------

class Transport(Strict):
    peer_port: int = Field(default=179, ge=1, le=65535)


class Timers(Strict):
    connect_retry_time_seconds: int = Field(default=120, ge=1, le=65535)
    hold_time_seconds: int = Field(default=90, ge=3, le=65535)
    keep_alive_time_seconds: int = Field(default=30, ge=1, le=21845)

    @model_validator(mode="after")
    def _keepalive_below_hold(self) -> Timers:
        if self.keep_alive_time_seconds >= self.hold_time_seconds:
            raise ValueError("keepAliveTimeSeconds must be less than holdTimeSeconds")
        return self


class GracefulRestart(Strict):
    enabled: bool = True
    restart_time_seconds: int = Field(default=120, ge=1, le=4095)


class Family(Strict):
    afi: Literal["ipv4", "ipv6"]
    safi: Literal["unicast"]
    advertisements: LabelSelector | None = None


def _check_secret_chars(v: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\"'\\;{}" for c in v):
        raise ValueError("must not contain control characters, quotes, backslashes, ';', '{' or '}'")
    return v


class PeerConfigSpec(Strict):
    transport: Transport = Transport()
    timers: Timers = Timers()
    ebgp_multihop: int = Field(default=1, ge=1, le=255)
    auth_secret_ref: Name | None = None
    auth_password_file: str | None = None
    graceful_restart: GracefulRestart = GracefulRestart()
    families: list[Family] = Field(
        default_factory=lambda: [Family(afi="ipv4", safi="unicast"), Family(afi="ipv6", safi="unicast")])

    @model_validator(mode="after")
    def _one_password_source(self) -> PeerConfigSpec:
        if self.auth_secret_ref and self.auth_password_file:
            raise ValueError("set authSecretRef or authPasswordFile, not both")
        if self.auth_password_file is not None:
            _check_secret_chars(self.auth_password_file)
        return self


class BGPPeerConfig(Strict):
    api_version: Literal["plexus.io/v1"]
    kind: Literal["BGPPeerConfig"]
    metadata: Metadata
    spec: PeerConfigSpec = PeerConfigSpec()


# ---- BGPAdvertisement --------------------------------------------------------------------

class Communities(Strict):
    standard: list[Annotated[str, AfterValidator(_check_standard)]] = []
    large: list[Annotated[str, AfterValidator(_check_large)]] = []
    well_known: list[Literal[tuple(WELL_KNOWN)]] = []  # type: ignore[valid-type]


class Attributes(Strict):
    communities: Communities = Communities()
    local_preference: int | None = Field(default=None, ge=0, le=4294967295)


class ServiceAddresses(Strict):
    addresses: list[Literal["LoadBalancerIP", "ClusterIP", "ExternalIP"]] = Field(min_length=1)


class Advertisement(Strict):
    # EgressGateway: the egress IPs this node holds while it is a policy's active gateway
    advertisement_type: Literal["PodCIDR", "Service", "EgressGateway"]
    service: ServiceAddresses | None = None
    selector: LabelSelector | None = None
    attributes: Attributes = Attributes()

    @model_validator(mode="after")
    def _service_needs_addresses(self) -> Advertisement:
        if self.advertisement_type == "Service" and self.service is None:
            raise ValueError("advertisementType Service needs service.addresses")
        return self


class AdvertisementSpec(Strict):
    advertisements: list[Advertisement] = Field(min_length=1)


class BGPAdvertisement(Strict):
    api_version: Literal["plexus.io/v1"]
    kind: Literal["BGPAdvertisement"]
    metadata: Metadata
    spec: AdvertisementSpec


# ---- BGPNodeConfigOverride ---------------------------------------------------------------

class InstanceOverride(Strict):
    name: Name
    router_id: ipaddress.IPv4Address | None = Field(None, alias="routerID")
    local_asn: ASN | None = Field(None, alias="localASN")
    local_address: IPAddress | None = None
    # The next hop of routes of the other family than a session's (IPv6 routes over an
    # IPv4 session, and the reverse): this node's address of that family.
    ipv4_next_hop: ipaddress.IPv4Address | None = Field(None, alias="ipv4NextHop")
    ipv6_next_hop: ipaddress.IPv6Address | None = Field(None, alias="ipv6NextHop")


class NodeOverrideSpec(Strict):
    bgp_instances: list[InstanceOverride] = []


class BGPNodeConfigOverride(Strict):
    """metadata.name is the node it applies to."""

    api_version: Literal["plexus.io/v1"]
    kind: Literal["BGPNodeConfigOverride"]
    metadata: Metadata
    spec: NodeOverrideSpec


MANIFEST_KINDS: dict[str, type[Strict]] = {
    "BGPClusterConfig": BGPClusterConfig,
    "BGPPeerConfig": BGPPeerConfig,
    "BGPAdvertisement": BGPAdvertisement,
    "BGPNodeConfigOverride": BGPNodeConfigOverride,
}

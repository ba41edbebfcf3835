"""Transparent encryption settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from plexus.core.config import Strict

WG_OVERHEAD = 80  # outer IPv6 (40) + UDP (8) + WireGuard header and tag (32): safe on any underlay


class EncryptionConfig(Strict):
    """WireGuard between every node of every connected cluster."""

    enabled: bool = Field(False, description="Encrypt pod traffic between nodes.")
    device: str = Field("plx_wg0", pattern=r"^[a-zA-Z0-9_.-]{1,15}$",
                        description="WireGuard interface name (unique per node in the lab).")
    port: int = Field(51871, ge=1, le=65535, description="UDP listen port.")
    backend: Literal["auto", "kernel", "userspace"] = Field(
        "auto", description="kernel module, wireguard-go, or whichever is available.")
    strict: bool = Field(False, description="Drop pod traffic to a remote node that has no peer yet.")
    table: int = Field(51871, ge=1, le=0xFFFFFFF0, description="Routing table of the encrypted routes.")
    rule_priority: int = Field(100, ge=2, le=32000, description="Priority of the ip rule to that table.")
    fwmark: int = Field(0x1E00, ge=0, le=0xFFFFFFFF,
                        description="Mark on the device's own UDP packets; a rule at "
                                    "rulePriority - 1 sends them to the main table, so an enrolled "
                                    "host's address, its endpoint too, can route through the device. "
                                    "0: no mark, and hosts' addresses are not encrypted.")
    tunnel_table: int = Field(51872, ge=1, le=0xFFFFFFF0,
                              description="Routing table of the routes to other nodes' addresses "
                                          "that tunnels between nodes (egress VXLAN) take.")
    tunnel_rule_priority: int = Field(
        98, ge=1, le=32000, description="Priority of the ip rules that send a tunnel's packets "
                                        "(by UDP destination port) to that table.")
    wireguard_go: str = Field("wireguard-go", description="The userspace implementation to run.")
    service_frontends: bool = Field(
        False, description="Route every global service's frontend addresses through the device "
                           "too: an enrolled host's datapath translates them on the device, so "
                           "its own requests to services leave encrypted (nodes translate on "
                           "pods' veths and need not).")

"""eBPF datapath settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from plexus.core.config import Strict


class FlowsServer(Strict):
    """The node's flows over TCP for the relay, with mutual TLS: only clients holding a
    certificate of the cluster CA whose name is listed get an answer."""

    address: str = Field(description="Address to listen on (the node's own).")
    port: int = Field(4244, ge=1, le=65535, description="TCP port (Hubble's peer port by default).")
    ca_file: Path = Field(description="CA that issued the relay's client certificate.")
    cert_file: Path = Field(description="This node's server certificate (its address in the SAN).")
    key_file: Path = Field(description="Its private key.")
    client_names: list[str] = Field(["relay"], min_length=1,
                                    description="Common names of the client certificates let in.")


class BpfConfig(Strict):
    """Identity-based policy on every pod's host-side veth."""

    enabled: bool = Field(False, description="Load the datapath and enforce policy.")
    pin_dir: Path = Field(Path("/sys/fs/bpf/plexus"),
                          description="Where maps are pinned (must be on a bpf filesystem).")
    flow_ring: int = Field(4096, ge=1, le=1_000_000,
                           description="How many of the last flows the node keeps for `plexus observe`.")
    flow_buffer_pages: int = Field(64, ge=1, le=4096,
                                   description="Pages per CPU of the kernel buffer verdicts are read "
                                               "from (a power of two); a burst larger than it is lost, "
                                               "and counted.")
    flows_server: FlowsServer | None = Field(None, description="Serve flows to the relay (mutual TLS).")
    uplink: str = Field("", pattern=r"^[a-zA-Z0-9_.-]{0,15}$",
                        description="An enrolled host's own interface: its endpoint's programs "
                                    "go on it with the directions turned (tc egress is the "
                                    "host's egress), where a pod's go on its host-side veth.")
    tunnel: str = Field("", pattern=r"^[a-zA-Z0-9_.-]{0,15}$",
                        description="An enrolled host's WireGuard device: what it decrypts is "
                                    "the host's traffic too, judged there as on the uplink "
                                    "(before encryption on the way out).")

    @field_validator("flow_buffer_pages")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, not {v}")
        return v

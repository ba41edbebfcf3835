"""The vmagent section of an enrolled host's agent config (written by `plexus vm join`)."""

from __future__ import annotations

from pydantic import Field

from clustermesh.config import EtcdSection
from clustermesh.vms import DEFAULT_LEASE
from plexus.core.config import Strict


class VmAgentConfig(Strict):
    """This host as an enrolled VM: its name, its etcd access and its lease."""

    enabled: bool = Field(False, description="Run as an enrolled VM or metal host.")
    etcd: EtcdSection = Field(default_factory=EtcdSection,
                              description="The cluster's etcd, with this VM's own certificate.")
    lease: int = Field(DEFAULT_LEASE, ge=2, le=3600,
                       description="Seconds of silence after which the mesh withdraws this host.")
    namespace: str = Field("default", description="The namespace the host's identity carries.")
    uplink: str = Field("eth0", pattern=r"^[a-zA-Z0-9_.-]{1,15}$",
                        description="The host's interface: its endpoint, where the datapath "
                                    "enforces the policies that select the host.")
    tunnel: str = Field("", pattern=r"^[a-zA-Z0-9_.-]{0,15}$",
                        description="The host's WireGuard device, an endpoint of the host as "
                                    "well: pods' traffic arrives there decrypted.")

"""ClusterMesh settings: the agent's section and the per-remote-cluster files."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field

from plexus.core.config import Strict


class EtcdSection(Strict):
    endpoints: list[str] = Field(default_factory=list,
                                 description="This cluster's etcd, e.g. https://172.31.1.250:2379.")
    trusted_ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class ClusterMeshConfig(Strict):
    """Where this cluster's own etcd is and where the remote clusters are described."""

    etcd: EtcdSection = Field(default_factory=EtcdSection)
    config_dir: Path | None = Field(None, description="One file per remote cluster, named after it.")
    direct_routes: bool = Field(True, description="Route to same-segment nodes' pod CIDRs directly.")
    registration: bool = Field(True, description="Register this node and its endpoints for the "
                               "apiserver (off on an enrolled VM, which registers itself).")
    config_poll_interval: float = Field(1.0, gt=0, description="How often the config dir is read.")


class RemoteClusterFile(Strict):
    """`<config-dir>/<cluster>`: how to reach a remote cluster's etcd (Cilium's format)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    endpoints: list[str] = Field(min_length=1)
    trusted_ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

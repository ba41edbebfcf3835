"""ClusterMesh settings of the node agent."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from plexus.core.config import Strict


class EtcdSection(Strict):
    endpoints: list[str] = Field(default_factory=list, description="This cluster's etcd, e.g. https://172.31.1.250:2379.")
    trusted_ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class ClusterMeshConfig(Strict):
    """Where this cluster's own etcd is and where the remote clusters are described."""

    etcd: EtcdSection = Field(default_factory=EtcdSection)  # type: ignore[arg-type]
    config_dir: Path | None = Field(None, description="One file per remote cluster, named after it.")

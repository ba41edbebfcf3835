"""The relay program's config (YAML, camelCase keys, unknown keys refused)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from clustermesh.config import EtcdSection
from plexus.agent import ClusterSection, MetricsSection
from plexus.core.config import Strict

DEFAULT_API_SOCKET = Path("/run/plexus/relay.sock")
DEFAULT_PORT = 4245  # Hubble Relay's


class NodeTls(Strict):
    """How the relay proves itself to one cluster's nodes, and how it knows them."""

    ca_file: Path = Field(description="The cluster's CA: it issued every node's flow server certificate.")
    cert_file: Path = Field(description="The relay's client certificate, issued by that CA.")
    key_file: Path = Field(description="Its private key.")


class Listen(Strict):
    address: str = Field("127.0.0.1", description="Where the web page and its API are served.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0: any free one).")


class RelaySection(Strict):
    """What the relay follows and how it merges."""

    node_port: int = Field(4244, ge=1, le=65535, description="The port every node serves its flows on.")
    node_tls: dict[str, NodeTls] = Field(default_factory=dict,
                                         description="Per cluster name: credentials for its nodes.")
    ring: int = Field(16384, ge=1, le=1_000_000, description="How many merged flows the relay keeps.")
    history: int = Field(4096, ge=0, description="Flows asked of a node when first connected.")
    merge_window_ms: int = Field(300, ge=0, le=5000,
                                 description="How long a flow waits for older ones from slower nodes "
                                             "before it is passed on, in time order.")


class RelayConfig(Strict):
    cluster: ClusterSection
    etcd: EtcdSection = Field(description="This cluster's etcd: where the mesh's node table is.")
    clustermesh_dir: Path | None = Field(None, description="One file per remote cluster (Cilium's "
                                                          "format), as the agents have.")
    api_socket: Path = Field(DEFAULT_API_SOCKET, description="Unix socket of the local API.")
    listen: Listen = Field(default_factory=lambda: Listen.model_validate({}))
    metrics: MetricsSection = Field(
        default_factory=lambda: MetricsSection.model_validate({"port": 9964}))
    relay: RelaySection = Field(default_factory=lambda: RelaySection.model_validate({}))
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")

"""ClusterMesh settings: the agent's section and the per-remote-cluster files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from plexus.core.config import ConfigError, Strict, parse, read_yaml


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
    mode: Literal["direct", "kvstoremesh"] = Field("direct", description=(
        "direct: one etcd connection per remote cluster, from its file in the config dir. "
        "kvstoremesh: every remote named in the config dir is read from this cluster's own "
        "etcd, where `plexus kvstoremesh` copies it (cilium/cache/...); one connection in all. "
        "A remote's file then only names it: it may be empty, its content is not read."))
    config_poll_interval: float = Field(1.0, gt=0, description=(
        "While the config dir is missing or cannot be watched: how often its stat is checked. "
        "Otherwise it is read when the kernel reports a change."))


class RemoteClusterFile(Strict):
    """`<config-dir>/<cluster>`: how to reach a remote cluster's etcd, in the format Cilium
    reads (etcd's client YAML: go.etcd.io/etcd/client/v3/yaml, through Cilium's
    pkg/kvstore). Keys Plexus does not use are ignored, see `read_remote_cluster_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    endpoints: list[str] = Field(min_length=1)
    trusted_ca_file: Path | None = None
    ca_file: Path | None = Field(None, description="etcd's older name of trusted-ca-file.")
    cert_file: Path | None = None
    key_file: Path | None = None
    dial_timeout: int | None = Field(
        None, gt=0, strict=True,
        description="Nanoseconds, as Go reads a time.Duration (5000000000 is 5s); "
                    "the deadline of each etcd call.")

    @property
    def ca(self) -> Path | None:
        return self.trusted_ca_file or self.ca_file

    @property
    def timeout(self) -> float:
        return self.dial_timeout / 1e9 if self.dial_timeout else 5.0


# The other keys of etcd's client YAML that Cilium passes through, with the JSON type Go
# decodes each into: a file with a wrong type is refused, as Cilium refuses it.
_DURATION, _SIZE = int, int
IGNORED_ETCD_KEYS: dict[str, type | tuple[type, ...]] = {
    "auto-sync-interval": _DURATION,
    "dial-keep-alive-time": _DURATION,
    "dial-keep-alive-timeout": _DURATION,
    "max-call-send-msg-size": _SIZE,
    "max-call-recv-msg-size": _SIZE,
    "username": str,
    "password": str,
    "reject-old-cluster": bool,
    "permit-without-stream": bool,
    "insecure-transport": bool,
    "insecure-skip-tls-verify": bool,
    "cilium-host-aliases": (list, dict, str),
}


def read_remote_cluster_file(path: Path) -> tuple[RemoteClusterFile, tuple[str, ...]]:
    """The file's settings and the keys it has that Plexus ignores.

    Like Cilium, a key nobody knows is no error (Go's decoder skips it); a known key of the
    wrong type is, and so is a file without endpoints."""
    data = read_yaml(path)
    source = str(path)
    if not isinstance(data, dict):
        return parse(RemoteClusterFile, data, source), ()
    used = {name.replace("_", "-") for name in RemoteClusterFile.model_fields}
    kept: dict[str, Any] = {}
    ignored = []
    problems = []
    for key, value in data.items():
        if key in used:
            kept[key] = value
            continue
        ignored.append(str(key))
        kind = IGNORED_ETCD_KEYS.get(str(key))
        wrong_bool = isinstance(value, bool) and kind is int
        if kind is not None and value is not None and (wrong_bool or not isinstance(value, kind)):
            problems.append(f"{key}: expected {_type_name(kind)}, got {type(value).__name__}")
    if problems:
        raise ConfigError(source, problems)
    return parse(RemoteClusterFile, kept, source), tuple(sorted(ignored))


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer (a duration in nanoseconds, or a size in bytes)",
             str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)

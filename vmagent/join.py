"""The host's side of joining: a checked bundle unpacked into the vmagent's state and config.

Keys and certificates are written 0600 in a 0700 directory; the config is the node agent's
(one cluster section, one section per module) with the host's own registration (vmagent)
in place of clustermesh's, and its address as its one-address "pod CIDR".
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vmagent.bundle import Bundle


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def unpack(bundle: Bundle, state: Path, api_socket: Path, wg_device: str,
           encryption: bool, bpf_pin_dir: Path | None = None, uplink: str = "eth0",
           strict: bool = False, bgp: bool = False) -> Path:
    """Unpack the bundle into `state` and write the vmagent's config; returns its path.
    `bpf_pin_dir`: where the datapath pins its maps (None: no datapath on this host).
    `strict`: traffic to a pod whose node has no WireGuard peer is dropped, not sent clear.
    `bgp`: run the BGP speaker (a metal host peering with its router)."""
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    etcd_dir = state / "etcd"
    _write_private(etcd_dir / "ca.crt", bundle.etcd.ca)
    _write_private(etcd_dir / "client.crt", bundle.etcd.cert)
    _write_private(etcd_dir / "client.key", bundle.etcd.key)
    mesh = state / "clustermesh"
    mesh.mkdir(parents=True, exist_ok=True)
    for name, r in bundle.remotes.items():
        _write_private(mesh / f"{name}.ca.crt", r.ca)
        _write_private(mesh / f"{name}.client.crt", r.cert)
        _write_private(mesh / f"{name}.client.key", r.key)
        _write_private(mesh / name, yaml.safe_dump({
            "endpoints": r.endpoints, "trusted-ca-file": str(mesh / f"{name}.ca.crt"),
            "cert-file": str(mesh / f"{name}.client.crt"),
            "key-file": str(mesh / f"{name}.client.key")}, sort_keys=False))
    for stale in mesh.iterdir():  # a cluster the new bundle no longer names is left
        if stale.is_file() and stale.name.split(".")[0] not in bundle.remotes:
            stale.unlink()
    etcd = {"endpoints": bundle.etcd.endpoints, "trustedCaFile": str(etcd_dir / "ca.crt"),
            "certFile": str(etcd_dir / "client.crt"), "keyFile": str(etcd_dir / "client.key")}
    tunnel = wg_device if encryption else ""
    config = {
        "cluster": {"name": bundle.cluster, "id": bundle.cluster_id},
        "node": {"name": bundle.name, "ip": str(bundle.ip), "podCIDR": f"{bundle.ip}/32",
                 "labels": dict(bundle.labels)},
        "stateDir": str(state / "state"),
        "apiSocket": str(api_socket),
        "metrics": {"port": None},
        "endpoints": {"persist": False},
        "clustermesh": {"etcd": etcd, "configDir": str(mesh), "directRoutes": False,
                        "registration": False},
        # the datapath on the device translates services: their requests leave encrypted
        "encryption": {"enabled": encryption, "device": wg_device, "strict": strict,
                       "serviceFrontends": bool(tunnel) and bpf_pin_dir is not None},
        # what the WireGuard device decrypts is the host's traffic: judged there too
        "bpf": ({"enabled": True, "pinDir": str(bpf_pin_dir), "uplink": uplink,
                 "tunnel": tunnel} if bpf_pin_dir is not None else {"enabled": False}),
        "bgp": {"enabled": bgp},
        "vmagent": {"enabled": True, "etcd": etcd, "lease": bundle.lease,
                    "namespace": bundle.namespace, "uplink": uplink, "tunnel": tunnel},
    }
    path = state / "vmagent.yaml"
    _write_private(path, f"# Written by `plexus vm join` for VM {bundle.name}.\n"
                   + yaml.safe_dump(config, sort_keys=False))
    return path

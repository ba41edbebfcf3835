"""eBPF datapath settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from plexus.core.config import Strict


class BpfConfig(Strict):
    """Identity-based policy on every pod's host-side veth."""

    enabled: bool = Field(False, description="Load the datapath and enforce policy.")
    pin_dir: Path = Field(Path("/sys/fs/bpf/plexus"),
                          description="Where maps are pinned (must be on a bpf filesystem).")
    uplink: str = Field("", pattern=r"^[a-zA-Z0-9_.-]{0,15}$",
                        description="An enrolled host's own interface: its endpoint's programs "
                                    "go on it with the directions turned (tc egress is the "
                                    "host's egress), where a pod's go on its host-side veth.")

"""eBPF datapath settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from plexus.core.config import Strict


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

    @field_validator("flow_buffer_pages")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, not {v}")
        return v

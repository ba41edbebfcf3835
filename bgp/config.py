"""The agent config section `bgp`."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from plexus.core.config import Strict


class BGPConfig(Strict):
    """How this node runs its BGP speaker (ExaBGP); what it announces comes from manifests."""

    enabled: bool = Field(True, description="Run the BGP speaker on this node.")
    exabgp: list[str] = Field(
        default_factory=lambda: [sys.executable, str(Path(__file__).with_name("launcher.py"))],
        description="Command that starts ExaBGP 5 (default: bgp/launcher.py, ExaBGP tuned).")
    async_limit: int = Field(100000, ge=0, description=(
        "API work steps ExaBGP runs per reactor loop (its default is 50; 0 keeps it)."))
    secrets_dir: Path = Field(Path("/etc/plexus/secrets"),
                              description="Where authSecretRef names a file holding the password.")
    reactor_speed: float = Field(
        0.5, ge=0.1, le=1.0,
        description="ExaBGP reactor loop time (exabgp.reactor.speed). An idle ExaBGP waits "
                    "speed/100 s for its sockets in each loop; below 0.1 that is 0 ms and it "
                    "spins a whole core. Work and I/O wake it at once whatever the value.")
    batch: int = Field(2000, ge=1, le=20000, description="Prefixes per bulk API command.")
    restart_backoff_max: float = Field(30.0, ge=0.1, description="Longest wait before restarting ExaBGP.")

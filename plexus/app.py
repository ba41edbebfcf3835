"""The composition root: which modules a node agent runs, in start order."""

from __future__ import annotations

from typing import Any

from bgp.module import module as bgp
from bpf.module import module as bpf
from clustermesh.module import module as clustermesh
from egress.module import module as egress
from encryption.module import module as encryption
from plexus.core.module import Module
from plexus.node.module import module as node

MODULES: list[Module[Any]] = [
    node,
    clustermesh,
    bpf,
    encryption,
    bgp,
    egress,
]

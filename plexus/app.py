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
from vmagent.module import module as vmagent

MODULES: list[Module[Any]] = [
    node,
    clustermesh,
    bpf,
    encryption,
    bgp,
    egress,
]

# An enrolled VM or metal host (`plexus vmagent`): a node's modules but BGP, with the host's
# own registration (vmagent) in place of clustermesh's node and endpoint registrations.
VM_MODULES: list[Module[Any]] = [
    node,
    clustermesh,
    bpf,
    encryption,
    vmagent,
]

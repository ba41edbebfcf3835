"""The composition root: which modules a node agent runs, in start order."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from bgp.config import BGPConfig
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

# An enrolled VM or metal host (`plexus vmagent`): a node's modules but egress, with the
# host's own registration (vmagent) in place of clustermesh's node and endpoint
# registrations. BGP runs on a metal host joined with `--bgp`: it peers with its router as
# the cluster's BGP manifests that select the host's labels say, announcing its address.
class HostBGPConfig(BGPConfig):
    """BGP on an enrolled host: off unless `plexus vm join --bgp` turned it on, so a config
    written before hosts could speak BGP keeps its host silent."""

    enabled: bool = Field(False, description="Run the BGP speaker (a metal host and its router).")


host_bgp = Module(name=bgp.name, doc=bgp.doc, config=HostBGPConfig, build=bgp.build)

VM_MODULES: list[Module[Any]] = [
    node,
    clustermesh,
    bpf,
    encryption,
    host_bgp,
    vmagent,
]

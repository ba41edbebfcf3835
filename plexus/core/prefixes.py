"""Host prefixes this node stands for on behalf of a feature, for BGP to announce.

A feature (the egress gateway, for the egress IP of a policy while this node is its active
gateway) writes a row; the BGP control plane announces each row as a host route to the
peers whose advertisements select `EgressGateway`-type prefixes, and withdraws it when the
row goes. Neither feature imports the other: this table is all they share.
"""

from __future__ import annotations

from dataclasses import dataclass

from plexus.core.module import Hive, Key
from plexus.core.tables import Table


@dataclass(frozen=True)
class HostPrefix:
    prefix: str  # "a.b.c.d/32" or "x::y/128"
    owner: str   # the module that wants it announced
    what: str    # why, for status pages ("egress IP of east/default/legacy-db")
    # extra copies of our AS in the path on eBGP: a longer path loses to a shorter one, so a
    # standby's route can win over one the router still keeps from a dead gateway
    as_path_prepend: int = 0

    @property
    def key(self) -> str:
        return self.prefix


HOST_PREFIXES: Key[Table[str, HostPrefix]] = Key("host-prefixes")


def host_prefixes(hive: Hive) -> Table[str, HostPrefix]:
    """The hive's table; the first module that asks for it creates it (build order free)."""
    table = hive.optional(HOST_PREFIXES)  # an empty table is falsy: compare with None
    if table is None:
        table = hive.provide(HOST_PREFIXES, Table("host-prefixes", key=lambda p: p.key))
    return table

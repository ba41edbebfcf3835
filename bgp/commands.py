"""ExaBGP API commands built from typed values: route text, the bulk form, peers added or removed.

Everything here is pure: typed prefixes, addresses and attributes in, command lines out.
A value that is not of the expected type, or text holding a control character (a newline
would start a second command), raises CommandError instead of reaching ExaBGP.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Mapping

from bgp.launcher import BULK, EOR, NEIGHBOR
from bgp.tables import IPAddress, IPNetwork, RouteAttrs


class CommandError(ValueError):
    """A value that must not be spliced into an ExaBGP command or config."""


def safe(text: str) -> str:
    """Refuse control characters (a newline would start a new command)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CommandError(f"control character in {text!r}")
    return text


def attrs_text(a: RouteAttrs) -> str:
    parts = [f"next-hop {address_text(a.next_hop)}" if a.next_hop is not None else "next-hop self"]
    if a.local_pref is not None:
        parts.append(f"local-preference {int(a.local_pref)}")
    if a.as_path:
        parts.append("as-path [" + " ".join(str(int(x)) for x in a.as_path) + "]")
    if a.communities:
        parts.append("community [" + " ".join(f"{int(x)}:{int(y)}" for x, y in a.communities) + "]")
    if a.large_communities:
        parts.append("large-community ["
                     + " ".join(f"{int(x)}:{int(y)}:{int(z)}" for x, y, z in a.large_communities) + "]")
    return " ".join(parts)


def prefix_text(n: IPNetwork) -> str:
    if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise CommandError(f"not a prefix: {n!r}")
    return str(n)


def address_text(a: IPAddress) -> str:
    if not isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise CommandError(f"not an address: {a!r}")
    return str(a)


def grouped(routes: Iterable[tuple[IPNetwork, RouteAttrs]], batch: int
            ) -> list[tuple[RouteAttrs, list[IPNetwork]]]:
    """Prefixes grouped by identical attributes and address family, in chunks of `batch`."""
    groups: dict[tuple[int, RouteAttrs], list[IPNetwork]] = {}
    for net, attrs in routes:
        prefix_text(net)
        if not isinstance(attrs, RouteAttrs):
            raise CommandError(f"not route attributes: {attrs!r}")
        groups.setdefault((net.version, attrs), []).append(net)
    out = []
    def order(kv: tuple[tuple[int, RouteAttrs], list[IPNetwork]]) -> tuple[object, ...]:
        (v, a), _ = kv
        return (v, -1 if a.local_pref is None else a.local_pref, a.communities, a.large_communities,
                a.as_path)

    for (_, attrs), nets in sorted(groups.items(), key=order):
        nets.sort()
        for i in range(0, len(nets), batch):
            out.append((attrs, nets[i:i + batch]))
    return out


def announce_commands(peer: IPAddress, routes: Iterable[tuple[IPNetwork, RouteAttrs]],
                      batch: int) -> list[str]:
    address_text(peer)
    return [safe(f"neighbor {address_text(peer)} announce attributes {attrs_text(a)} nlri "
                 + " ".join(prefix_text(n) for n in nets))
            for a, nets in grouped(routes, batch)]


def withdrawn(nets: Iterable[IPNetwork], next_hops: Mapping[IPNetwork, IPAddress | None] | None
              ) -> list[tuple[IPNetwork, RouteAttrs]]:
    """Prefixes to withdraw with the next hop they were announced with: ExaBGP resolves
    `next-hop self` even for a withdrawal, which fails for the other family than the session's."""
    nh = next_hops or {}
    return [(n, RouteAttrs(next_hop=nh.get(n))) for n in nets]


def withdraw_commands(peer: IPAddress, nets: Iterable[IPNetwork], batch: int,
                      next_hops: Mapping[IPNetwork, IPAddress | None] | None = None) -> list[str]:
    address_text(peer)
    return [safe(f"neighbor {address_text(peer)} withdraw attributes {attrs_text(a)} nlri "
                 + " ".join(prefix_text(n) for n in ns))
            for a, ns in grouped(withdrawn(nets, next_hops), batch)]


def pack_prefixes(nets: Iterable[IPNetwork]) -> str:
    """Prefixes in BGP NLRI wire form (mask length, significant address bytes), base64."""
    out = bytearray()
    for n in nets:
        size = (n.prefixlen + 7) // 8
        out.append(n.prefixlen)
        out += n.network_address.packed[:size]
    return base64.b64encode(bytes(out)).decode()


def bulk_commands(peer: IPAddress, gone: Iterable[IPNetwork], new: Iterable[tuple[IPNetwork, RouteAttrs]],
                  batch: int, next_hops: Mapping[IPNetwork, IPAddress | None] | None = None) -> list[str]:
    """The same changes as withdraw_commands + announce_commands, in the compact
    `plexus-bulk` form that bgp/launcher.py adds to ExaBGP (withdrawals first)."""
    head = f"neighbor {address_text(peer)} {BULK}"
    fam = {4: "ipv4", 6: "ipv6"}
    out = [f"{head} withdraw {fam[ns[0].version]} {pack_prefixes(ns)}"
           + ("" if a.next_hop is None else f" {attrs_text(a)}")
           for a, ns in grouped(withdrawn(gone, next_hops), batch)]
    out += [safe(f"{head} announce {fam[ns[0].version]} {pack_prefixes(ns)} {attrs_text(a)}")
            for a, ns in grouped(new, batch)]
    return out


def end_of_rib_commands(peer: IPAddress, families: Iterable[str], extended: bool = False) -> list[str]:
    """End-of-RIB for the session, sent after every update queued before it: for each family
    it negotiated (`plexus-eor`, bgp/launcher.py), else for each configured unicast family."""
    if extended:
        return [f"neighbor {address_text(peer)} {EOR}"]
    fams = [f for f in families if f in ("ipv4", "ipv6")]
    return [f"neighbor {address_text(peer)} announce eor {f} unicast" for f in fams]


def probe_command() -> str:
    """Answered "done" only by an ExaBGP started through bgp/launcher.py."""
    return BULK


def add_neighbors_command(config: str) -> str:
    """Start the peers of `config` (a rendered config: process and neighbor sections) in the
    running ExaBGP; base64, so the multi-line config travels as one command."""
    return f"{NEIGHBOR} add {base64.b64encode(config.encode()).decode()}"


def remove_neighbor_command(peer: IPAddress) -> str:
    """Stop the session with the peer (no NOTIFICATION) and forget it."""
    return f"{NEIGHBOR} remove {address_text(peer)}"

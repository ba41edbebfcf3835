"""The routes ExaBGP announces to each peer: the one record of what went out.

A fresh ExaBGP holds exactly what its config carried; after that only acknowledged API
commands change it. The Ops diff desired rows against it, and status, metrics and
`plexus bgp routes advertised` read it; nothing else keeps a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from bgp.tables import IPAddress, IPNetwork, Neighbor, RouteAttrs

DEFAULT_LOCAL_PREF = 100  # what ExaBGP sends to an iBGP peer when no advertisement sets one


def _order(a: IPAddress | IPNetwork) -> tuple[int, IPAddress | IPNetwork]:
    return a.version, a


class Announced(Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]]):
    """peer -> prefix -> attributes, for peers with at least one route announced."""

    def __init__(self) -> None:
        self._routes: dict[IPAddress, dict[IPNetwork, RouteAttrs]] = {}

    def __getitem__(self, peer: IPAddress) -> Mapping[IPNetwork, RouteAttrs]:
        return self._routes[peer]

    def __iter__(self) -> Iterator[IPAddress]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def of(self, peer: IPAddress) -> Mapping[IPNetwork, RouteAttrs]:
        return self._routes.get(peer, {})

    def count(self, peer: IPAddress) -> int:
        return len(self._routes.get(peer, {}))

    def reset(self, held: Mapping[IPAddress, Mapping[IPNetwork, RouteAttrs]]) -> None:
        """A fresh ExaBGP: it holds what its config carried and nothing else."""
        self._routes = {}
        for peer, routes in held.items():
            self.load(peer, routes)

    def load(self, peer: IPAddress, routes: Mapping[IPNetwork, RouteAttrs]) -> None:
        """A peer just loaded into ExaBGP with these routes in its config."""
        if routes:
            self._routes[peer] = dict(routes)
        else:
            self._routes.pop(peer, None)

    def drop(self, peer: IPAddress) -> None:
        """The peer is gone from ExaBGP, and its routes with it."""
        self._routes.pop(peer, None)

    def clear(self) -> None:
        self._routes = {}

    def sent(self, peer: IPAddress, gone: Iterable[IPNetwork],
             new: Iterable[tuple[IPNetwork, RouteAttrs]]) -> None:
        """ExaBGP acknowledged these withdrawals and announcements to the peer."""
        cur = self._routes.setdefault(peer, {})
        for n in gone:
            cur.pop(n, None)
        for n, a in new:
            cur[n] = a
        if not cur:
            del self._routes[peer]

    def rows(self, peer: IPAddress | None = None) -> list[tuple[IPAddress, IPNetwork, RouteAttrs]]:
        """(peer, prefix, attributes), peers and prefixes in address order, IPv4 first."""
        return [(p, n, a) for p in sorted(self._routes, key=_order) if peer is None or p == peer
                for n, a in sorted(self._routes[p].items(), key=lambda kv: _order(kv[0]))]


def on_the_wire(n: Neighbor, a: RouteAttrs) -> dict[str, object]:
    """The path attributes ExaBGP sends this peer for a route with these attributes:
    ORIGIN IGP; AS_PATH as the route carries it, else empty on iBGP and our AS on eBGP;
    NEXT_HOP the session's local address unless the route carries one; LOCAL_PREF only on
    iBGP (100 unless set), since it never crosses an AS boundary; communities as they are."""
    ebgp = n.peer_asn != n.local_asn
    return {
        "origin": "igp",
        "asPath": list(a.as_path) if a.as_path else [n.local_asn] if ebgp else [],
        "nextHop": str(a.next_hop or n.local_address),
        "localPreference": None if ebgp else (DEFAULT_LOCAL_PREF if a.local_pref is None else a.local_pref),
        "communities": [f"{x}:{y}" for x, y in a.communities],
        "largeCommunities": [f"{x}:{y}:{z}" for x, y, z in a.large_communities],
    }


def wire_text(wire: Mapping[str, object]) -> str:
    """on_the_wire in ExaBGP's words, for `plexus bgp routes advertised`."""
    parts = [f"next-hop {wire['nextHop']}"]
    path = wire["asPath"]
    assert isinstance(path, list)
    parts.append("as-path [" + " ".join(map(str, path)) + "]")
    if wire["localPreference"] is not None:
        parts.append(f"local-preference {wire['localPreference']}")
    for key, word in (("communities", "community"), ("largeCommunities", "large-community")):
        values = wire[key]
        assert isinstance(values, list)
        if values:
            parts.append(f"{word} [" + " ".join(values) + "]")
    return " ".join(parts)

"""The Ops under the generic reconciler: each peer's desired routes into ExaBGP.

Only the difference between a PeerRoutes row and what ExaBGP announces to that peer
(bgp/announced.py) is sent: as `plexus-bulk` commands (packed prefixes, added to ExaBGP by
bgp/launcher.py) when the running ExaBGP answers the probe, else as ExaBGP's own
`announce/withdraw attributes ... nlri` text (bgp/commands.py). Drain is a desired state
with no routes, so it withdraws through the same path. Once a peer's routes are queued in
ExaBGP, End-of-RIB is asked for if its session came up since the last one (bgp/speaker.py);
a push that failed is retried by the reconciler, and End-of-RIB waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bgp.commands import announce_commands, bulk_commands, withdraw_commands
from bgp.speaker import Speaker
from bgp.tables import IPAddress, IPNetwork, PeerRoutes, RouteAttrs
from plexus.core.reconciler import PermanentError, TemporaryError


class RoutesOps:
    """Makes ExaBGP's announcements to one peer equal a PeerRoutes row: only the difference."""

    def __init__(self, speaker: Speaker, on_sent: Callable[[IPAddress, int, int], None] = lambda *_: None
                 ) -> None:
        self.speaker = speaker
        self.on_sent = on_sent

    async def update(self, row: PeerRoutes) -> None:
        sp = self.speaker
        if not sp.serves(row.peer):
            raise TemporaryError(f"peer {row.peer} is not configured in ExaBGP yet", delay=0.5)
        if not sp.ready():
            raise TemporaryError("ExaBGP is not running yet", delay=0.5)
        cur = sp.announced.of(row.peer)
        gone = [n for n in cur if n not in row.routes]
        new = [(n, a) for n, a in row.routes.items() if cur.get(n) != a]
        try:
            await self._apply(row.peer, gone, new, {n: cur[n].next_hop for n in gone})
        except PermanentError:
            # ExaBGP refused some routes and will never send them: the router should not
            # wait for them either. Status shows the refusal until the row changes.
            await sp.end_of_rib(row.peer)
            raise
        # Everything wanted is queued in ExaBGP: End-of-RIB goes out behind it.
        await sp.end_of_rib(row.peer)

    async def delete(self, row: PeerRoutes) -> None:
        sp = self.speaker
        cur = sp.announced.of(row.peer)
        # A peer no longer wanted is being removed from ExaBGP, its routes with it: a
        # withdrawal racing that removal would only be refused.
        if not cur or row.peer not in sp.neighbors or not sp.serves(row.peer) or not sp.ready():
            sp.announced.drop(row.peer)
            return
        await self._apply(row.peer, list(cur), [], {n: a.next_hop for n, a in cur.items()})

    async def prune(self, rows: Iterable[PeerRoutes]) -> None:
        keep = {r.peer for r in rows}
        for peer in [p for p in self.speaker.announced if p not in keep]:
            await self.delete(PeerRoutes(peer, {}))

    async def _apply(self, peer: IPAddress, gone: list[IPNetwork], new: list[tuple[IPNetwork, RouteAttrs]],
                     next_hops: dict[IPNetwork, IPAddress | None]) -> None:
        sp = self.speaker
        b = sp.batch
        if await sp.bulk_supported():
            cmds = bulk_commands(peer, gone, new, b, next_hops)
        else:
            cmds = withdraw_commands(peer, gone, b, next_hops) + announce_commands(peer, new, b)
        await sp.send(cmds)
        if sp.serves(peer):  # a reload may have removed the peer, and its routes, meanwhile
            sp.announced.sent(peer, gone, new)
        self.on_sent(peer, len(new), len(gone))

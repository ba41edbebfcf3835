"""Starts ExaBGP in-process, tuned for bulk route changes from the agent.

Two changes before ExaBGP's own `main` runs:

- a larger per-loop work budget for API commands (PLEXUS_EXABGP_ASYNC_LIMIT): ExaBGP runs
  scheduled API work in slices of `ASYNC.LIMIT` (50) steps per reactor loop;
- the `plexus-bulk` API command. ExaBGP's `announce attributes ... nlri` handler spends
  most of its time not in parsing but in `Neighbor.remove_self`, which deep-copies every
  change with its attributes (about 1 ms per prefix). `plexus-bulk` parses the shared
  attributes once per command with ExaBGP's own parser, resolves `next-hop self` once per
  peer, builds the NLRI of a packed prefix list directly, and queues them in the peer's
  outgoing RIB the way that handler does, so the updates still go out grouped:

      [neighbor <ip>] plexus-bulk announce ipv4|ipv6 <prefixes> [<attributes>]
      [neighbor <ip>] plexus-bulk withdraw ipv4|ipv6 <prefixes>
      plexus-bulk                                   (probe: answers "done")

  <prefixes> is base64 of the prefixes in BGP NLRI wire form (mask length, then the
  significant address bytes); <attributes> is ExaBGP's text (`next-hop self community [...]`).
  Every command is answered "done" or "error" in order with ExaBGP's other commands.

Stdlib and ExaBGP only: ExaBGP runs this file as a script.
"""

from __future__ import annotations

import base64
import binascii
import os
import select
import sys
import threading
from collections.abc import Iterator
from typing import Any

BULK = "plexus-bulk"
STEP = 2000  # prefixes queued per scheduler step, so keepalives and reads interleave
WIDTH = {"ipv4": 4, "ipv6": 16}


def die_with_parent() -> None:
    """ExaBGP must not outlive its agent: a restarted agent would start a second speaker
    for the same session and the two would take turns resetting it. ExaBGP drops to an
    unprivileged user, which clears PR_SET_PDEATHSIG, so a thread waits on the parent's pidfd."""
    parent = int(os.environ.get("PLEXUS_PARENT_PID", "0") or 0)
    if not parent:
        return
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(1)
    if os.getppid() != parent:  # the agent died before the watch was in place
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def unpack_prefixes(family: str, blob: str) -> list[tuple[bytes, int]]:
    """(address padded to the family's width, mask length) for each packed prefix."""
    width = WIDTH[family]
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("prefixes are not base64") from None
    out = []
    i, end = 0, len(data)
    while i < end:
        mask = data[i]
        size = (mask + 7) // 8
        if mask > width * 8 or i + 1 + size > end:
            raise ValueError(f"bad {family} prefix at byte {i}")
        out.append((data[i + 1:i + 1 + size].ljust(width, b"\0"), mask))
        i += 1 + size
    return out


def parse_bulk(command: str) -> tuple[str, str, list[tuple[bytes, int]], str]:
    """`plexus-bulk <action> <family> <prefixes> [<attributes>]` -> its parts."""
    words = command.split(" ", 4)
    if len(words) < 4 or words[0] != BULK or words[1] not in ("announce", "withdraw") \
            or words[2] not in WIDTH:
        raise ValueError(f"expected '{BULK} announce|withdraw ipv4|ipv6 <prefixes> [attributes]'")
    attributes = words[4].strip() if len(words) == 5 else ""
    return words[1], words[2], unpack_prefixes(words[2], words[3]), attributes or "next-hop self"


def install_bulk_command() -> bool:
    """Hooks `plexus-bulk` in front of ExaBGP's command dispatch; False if this ExaBGP's
    layout is not the one the command was written against (the agent then uses text)."""
    try:
        from exabgp.bgp.message import Action
        from exabgp.bgp.message.update.nlri import CIDR, INET
        from exabgp.logger import log
        from exabgp.protocol.family import AFI, SAFI
        from exabgp.reactor.api import API
        from exabgp.reactor.api.command.limit import extract_neighbors, match_neighbors
        from exabgp.rib.change import Change
        from exabgp.rib.outgoing import OutgoingRIB
    except ImportError:
        return False
    if not all(hasattr(OutgoingRIB, m) for m in ("in_cache", "_update_rib")):
        return False
    afis = {"ipv4": AFI.ipv4, "ipv6": AFI.ipv6}

    def queue(rib: Any, change: Any) -> None:
        """OutgoingRIB.add_to_rib (announce) or ExaBGP's withdraw path, without a copy; a change
        still waiting to be sent for the same prefix is dropped from its attribute group first,
        so the last command for a prefix wins whatever the groups' order."""
        if change.nlri.action == Action.ANNOUNCE and rib.in_cache(change):
            return
        index = change.index()
        pending = rib._new_nlri.get(index)
        if pending is not None:
            group = rib._new_attr_af_nlri.get(pending.attributes.index(), {}).get(
                change.nlri.family().afi_safi())
            if group:
                group.pop(index, None)
        rib._update_rib(change)

    def bulk(api: Any, reactor: Any, service: str, line: str) -> bool:
        def callback() -> Iterator[bool]:
            try:
                descriptions, command = extract_neighbors(line)
                if command == BULK:  # the probe
                    reactor.processes.answer_done(service)
                    yield True
                    return
                action, family, prefixes, attributes = parse_bulk(command)
                peers = match_neighbors(reactor.peers(service), descriptions)
                neighbors = [n for name, n in reactor.configuration.neighbors.items() if name in peers]
                afi = afis[family]
                if not neighbors or any((afi, SAFI.unicast) not in n.families() for n in neighbors):
                    api.log_failure(f"{BULK}: no neighbor with {family} unicast matches: {line[:200]}")
                    reactor.processes.answer_error(service)
                    yield True
                    return
                # ExaBGP's own parser reads the shared attributes, once.
                dummy = "0.0.0.0/0" if family == "ipv4" else "::/0"
                parsed = api.api_attributes(f"announce attributes {attributes} nlri {dummy}", peers)
                if len(parsed) != 1:
                    api.log_failure(f"{BULK}: could not parse attributes: {attributes[:200]}")
                    reactor.processes.answer_error(service)
                    yield True
                    return
                act = Action.ANNOUNCE if action == "announce" else Action.WITHDRAW
                for n in neighbors:
                    template = n.remove_self(parsed[0])  # resolves next-hop self for this peer
                    nexthop, attrs, rib = template.nlri.nexthop, template.attributes, n.rib.outgoing
                    for start in range(0, len(prefixes), STEP):
                        for packed, mask in prefixes[start:start + STEP]:
                            nlri = INET(afi, SAFI.unicast, act)
                            nlri.cidr = CIDR(packed, mask)
                            nlri.nexthop = nexthop
                            queue(rib, Change(nlri, attrs))
                        yield False
                log.info(lambda: f"{BULK}: {action} {len(prefixes)} {family} prefixes to "
                                 f"{', '.join(peers)}", "processes")
                reactor.processes.answer_done(service)
            except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
                api.log_failure(f"{BULK}: {e}: {line[:200]}")
                reactor.processes.answer_error(service)
                yield True

        # Scheduled like every route command, so answers keep the order of the commands.
        reactor.asynchronous.schedule(service, line, callback())
        return True

    response = API.response
    if getattr(response, "plexus_bulk", False):
        return True

    def dispatch(self: Any, reactor: Any, service: str, command: str, use_json: bool) -> Any:
        if BULK in command.split(" ", 3)[:3]:
            return bulk(self, reactor, service, command)
        return response(self, reactor, service, command, use_json)

    dispatch.plexus_bulk = True  # type: ignore[attr-defined]
    API.response = dispatch
    return True


def main() -> None:
    die_with_parent()
    limit = int(os.environ.get("PLEXUS_EXABGP_ASYNC_LIMIT", "0") or 0)
    if limit > 0:
        try:
            from exabgp.reactor.asynchronous import ASYNC
            ASYNC.LIMIT = limit
        except ImportError:  # another ExaBGP layout: run it unchanged
            pass
    install_bulk_command()
    from exabgp.application.main import main as exabgp_main

    sys.argv[0] = "exabgp"
    exabgp_main()


if __name__ == "__main__":
    main()

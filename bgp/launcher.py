"""Starts ExaBGP in-process, tuned for bulk route changes from the agent.

Three changes before ExaBGP's own `main` runs:

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

- the `plexus-neighbor` API command: adds peers (their config sections, base64) to the
  running ExaBGP or removes them, leaving every other session alone; see neighbor_steps.

      plexus-neighbor add <base64 of a config with a process and neighbor sections>
      plexus-neighbor remove <peer address>

- the `plexus-eor` API command: End-of-RIB for each family the peer's session negotiated,
  queued behind every update already queued. ExaBGP's `announce eor <afi> <safi>` sends it
  for whatever family it names, negotiated or not, and a router (GoBGP) resets the session
  on an UPDATE of a family it did not negotiate.

      [neighbor <ip>] plexus-eor

- `launcher.py --validate` reads a config on stdin and says whether ExaBGP's parser takes
  it (the agent checks a config this way before it replaces the running one).

  <prefixes> is base64 of the prefixes in BGP NLRI wire form (mask length, then the
  significant address bytes); <attributes> is ExaBGP's text (`next-hop self community [...]`).
  Every command is answered "done" or "error" in order with ExaBGP's other commands.

Stdlib and ExaBGP only: ExaBGP runs this file as a script.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

BULK = "plexus-bulk"
NEIGHBOR = "plexus-neighbor"
EOR = "plexus-eor"
VALIDATE = "--validate"
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


@dataclass(frozen=True)
class ExaBGP:
    """The ExaBGP internals the commands use: the one place that knows their layout.

    ExaBGP has no type information, so these are Any; nothing outside this file sees them."""

    action: Any                  # exabgp.bgp.message.Action
    cidr: Any                    # exabgp.bgp.message.update.nlri.CIDR
    inet: Any                    # exabgp.bgp.message.update.nlri.INET
    change: Any                  # exabgp.rib.change.Change
    afis: dict[str, Any]         # "ipv4"/"ipv6" -> exabgp.protocol.family.AFI
    family: Any                  # exabgp.protocol.family.Family
    unicast: Any                 # exabgp.protocol.family.SAFI.unicast
    api: Any                     # exabgp.reactor.api.API, whose response() dispatches commands
    configuration: Any           # exabgp.configuration.configuration.Configuration
    peer: Any                    # exabgp.reactor.peer.Peer
    extract_neighbors: Callable[[str], tuple[Any, str]]
    match_neighbors: Callable[[Any, Any], list[str]]
    log: Any                     # exabgp.logger.log


def exabgp_module(name: str) -> ModuleType:
    return importlib.import_module(f"exabgp.{name}")


def load_exabgp() -> ExaBGP | None:
    """ExaBGP's internals, or None if this ExaBGP's layout is not the one the commands were
    written against (the agent then uses text commands, and restarts ExaBGP for new peers)."""
    try:
        message = exabgp_module("bgp.message")
        nlri = exabgp_module("bgp.message.update.nlri")
        family = exabgp_module("protocol.family")
        limit = exabgp_module("reactor.api.command.limit")
        outgoing = exabgp_module("rib.outgoing").OutgoingRIB
        x = ExaBGP(
            action=message.Action, cidr=nlri.CIDR, inet=nlri.INET,
            change=exabgp_module("rib.change").Change,
            afis={"ipv4": family.AFI.ipv4, "ipv6": family.AFI.ipv6}, family=family.Family,
            unicast=family.SAFI.unicast,
            api=exabgp_module("reactor.api").API,
            configuration=exabgp_module("configuration.configuration").Configuration,
            peer=exabgp_module("reactor.peer").Peer, extract_neighbors=limit.extract_neighbors,
            match_neighbors=limit.match_neighbors, log=exabgp_module("logger").log)
    except (ImportError, AttributeError):
        return None
    if not all(hasattr(outgoing, m) for m in ("in_cache", "_update_rib")):
        return None
    return x


def queue(x: ExaBGP, rib: Any, change: Any) -> None:
    """OutgoingRIB.add_to_rib (announce) or ExaBGP's withdraw path, without a copy; a change
    still waiting to be sent for the same prefix is dropped from its attribute group first,
    so the last command for a prefix wins whatever the groups' order."""
    if change.nlri.action == x.action.ANNOUNCE and rib.in_cache(change):
        return
    index = change.index()
    pending = rib._new_nlri.get(index)
    if pending is not None:
        group = rib._new_attr_af_nlri.get(pending.attributes.index(), {}).get(
            change.nlri.family().afi_safi())
        if group:
            group.pop(index, None)
    rib._update_rib(change)


def bulk_targets(x: ExaBGP, reactor: Any, peers: list[str], family: str) -> list[Any]:
    """The configured neighbors the command names; each must carry the family."""
    neighbors = [n for name, n in reactor.configuration.neighbors.items() if name in peers]
    if not neighbors or any((x.afis[family], x.unicast) not in n.families() for n in neighbors):
        raise ValueError(f"no neighbor with {family} unicast matches")
    return neighbors


def shared_attributes(api: Any, peers: list[str], family: str, attributes: str) -> Any:
    """ExaBGP's own parser reads the attributes once, on a placeholder prefix."""
    dummy = "0.0.0.0/0" if family == "ipv4" else "::/0"
    parsed = api.api_attributes(f"announce attributes {attributes} nlri {dummy}", peers)
    if len(parsed) != 1:
        raise ValueError(f"could not parse attributes: {attributes[:200]}")
    return parsed[0]


def queue_prefixes(x: ExaBGP, neighbors: list[Any], template: Any, action: str, family: str,
                   prefixes: list[tuple[bytes, int]]) -> Iterator[bool]:
    """Queue every prefix in each neighbor's outgoing RIB, STEP at a time."""
    act = x.action.ANNOUNCE if action == "announce" else x.action.WITHDRAW
    afi = x.afis[family]
    for n in neighbors:
        resolved = n.remove_self(template)  # resolves next-hop self for this peer
        nexthop, attrs, rib = resolved.nlri.nexthop, resolved.attributes, n.rib.outgoing
        for start in range(0, len(prefixes), STEP):
            for packed, mask in prefixes[start:start + STEP]:
                nlri = x.inet(afi, x.unicast, act)
                nlri.cidr = x.cidr(packed, mask)
                nlri.nexthop = nexthop
                queue(x, rib, x.change(nlri, attrs))
            yield False


def bulk_steps(x: ExaBGP, api: Any, reactor: Any, service: str, line: str) -> Iterator[bool]:
    """`plexus-bulk`, run by ExaBGP's scheduler; answers "done" or "error" when finished."""
    try:
        descriptions, command = x.extract_neighbors(line)
        if command == BULK:  # the probe
            reactor.processes.answer_done(service)
            yield True
            return
        action, family, prefixes, attributes = parse_bulk(command)
        peers = x.match_neighbors(reactor.peers(service), descriptions)
        neighbors = bulk_targets(x, reactor, peers, family)
        template = shared_attributes(api, peers, family, attributes)
        yield from queue_prefixes(x, neighbors, template, action, family, prefixes)
        x.log.info(lambda: f"{BULK}: {action} {len(prefixes)} {family} prefixes to "
                           f"{', '.join(peers)}", "processes")
        reactor.processes.answer_done(service)
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        api.log_failure(f"{BULK}: {e}: {line[:200]}")
        reactor.processes.answer_error(service)
        yield True


def eor_steps(x: ExaBGP, reactor: Any, service: str, line: str) -> Iterator[bool]:
    """`[neighbor <ip>] plexus-eor`: End-of-RIB per negotiated family of each established
    session named; sent once nothing queued before it is left (ExaBGP's peer loop)."""
    try:
        descriptions, command = x.extract_neighbors(line)
        if command != EOR:
            raise ValueError(f"expected '[neighbor <ip>] {EOR}'")
        if descriptions and isinstance(descriptions[0], str):
            # ExaBGP returns one selector's words unwrapped when no word follows the command
            descriptions = [descriptions]
        keys = x.match_neighbors(reactor.established_peers(), descriptions)
        if not keys:
            raise ValueError("no established session matches")
        for key in keys:
            proto = reactor._peers[key].proto
            for afi, safi in proto.negotiated.families if proto is not None else ():
                reactor.configuration.neighbors[key].eor.append(x.family(afi, safi))
        reactor.processes.answer_done(service)
    except Exception as e:  # the agent waits for an answer, whatever failed
        reason = f"{EOR}: {e}: {line[:200]}"
        x.log.info(lambda: reason, "processes")
        reactor.processes.answer_error(service)
    yield True


def parse_neighbor_command(command: str) -> tuple[str, str]:
    """`plexus-neighbor add <base64 config>` or `plexus-neighbor remove <address>` -> its parts."""
    words = command.split(" ")
    if len(words) != 3 or words[0] != NEIGHBOR or words[1] not in ("add", "remove"):
        raise ValueError(f"expected '{NEIGHBOR} add <base64 config>' or '{NEIGHBOR} remove <address>'")
    return words[1], words[2]


def add_neighbors(x: ExaBGP, reactor: Any, text: str) -> list[str]:
    """Parse the neighbor sections of `text` (a config of its own) and start their peers."""
    config = x.configuration([text], text=True)
    if not config.reload():
        raise ValueError(f"config refused: {str(config.error).strip()}")
    for key in config.neighbors:
        if key in reactor._peers or key in reactor.configuration.neighbors:
            raise ValueError(f"{key} already runs")
    for key, neighbor in config.neighbors.items():
        reactor.configuration.neighbors[key] = neighbor
        reactor._peers[key] = x.peer(neighbor, reactor)
    return list(config.neighbors)


def remove_neighbors(reactor: Any, address: str) -> list[str]:
    """Stop (without NOTIFICATION) and forget every neighbor with this peer address."""
    removed = []
    for key, neighbor in list(reactor.configuration.neighbors.items()):
        if str(neighbor["peer-address"]) == address:
            del reactor.configuration.neighbors[key]
            peer = reactor._peers.get(key)
            if peer is not None:
                peer.remove()
            removed.append(key)
    return removed


def neighbor_steps(x: ExaBGP, reactor: Any, service: str, command: str) -> Iterator[bool]:
    """`plexus-neighbor`: add or remove peers of the running ExaBGP, the others untouched.

    ExaBGP's own reload (the `reload` command, SIGUSR1) re-reads the whole config file: as
    the unprivileged user ExaBGP drops to, which cannot read the agent's 0600 file; parsing
    every peer's static routes again (seconds for 100,000, with keepalives stalled); only
    after every peer's queued updates went out, which a peer that is down never does, and
    otherwise dropped; and it answers before it ran. These commands touch only the peers
    they name and answer after they ran. A removed peer leaves the reactor on its next turn,
    which comes before the agent's next command (sent only after this answer)."""
    try:
        action, arg = parse_neighbor_command(command)
        if action == "add":
            text = base64.b64decode(arg, validate=True).decode()
            keys = add_neighbors(x, reactor, text)
        else:
            keys = remove_neighbors(reactor, arg)
        x.log.info(lambda: f"{NEIGHBOR}: {action} {', '.join(keys) or 'nothing'}", "reactor")
        reactor.processes.answer_done(service)
    except Exception as e:  # the agent waits for an answer, whatever failed
        reason = f"{NEIGHBOR}: {e}: {command[:200]}"
        x.log.error(lambda: reason, "reactor")
        reactor.processes.answer_error(service)
    yield True


def install_commands() -> bool:
    """Hooks `plexus-bulk`, `plexus-neighbor` and `plexus-eor` in front of ExaBGP's command dispatch; False
    if this ExaBGP's layout is not the one they were written against."""
    x = load_exabgp()
    if x is None:
        return False
    if getattr(x.api, "plexus_commands", False):
        return True
    response = x.api.response

    def dispatch(api: Any, reactor: Any, service: str, command: str, use_json: bool) -> Any:
        # Scheduled like every route command, so answers keep the order of the commands.
        if command.startswith(NEIGHBOR + " "):
            reactor.asynchronous.schedule(service, command, neighbor_steps(x, reactor, service, command))
            return True
        if EOR in command.split(" ", 3)[:3]:
            reactor.asynchronous.schedule(service, command, eor_steps(x, reactor, service, command))
            return True
        if BULK in command.split(" ", 3)[:3]:
            reactor.asynchronous.schedule(service, command, bulk_steps(x, api, reactor, service, command))
            return True
        return response(api, reactor, service, command, use_json)

    x.api.response = dispatch
    x.api.plexus_commands = True
    return True


def refusal(text: str) -> str:
    """Why ExaBGP's own parser refuses this config ("" if it takes it): the same checks
    ExaBGP runs on start, where a refusal makes it exit."""
    x = load_exabgp()
    if x is None:
        return ""
    try:
        env = exabgp_module("environment").getenv()
        env.log.destination = "stderr"
        env.log.level = "CRITICAL"
        x.log.init(env)
        config = x.configuration([text], text=True)
        if not config.reload():
            return " ".join(str(config.error).split()) or "refused"
    except Exception as e:  # ExaBGP raises (TypeError, ValueError, ...) for some refusals
        return " ".join(str(e).split()) or type(e).__name__
    return ""


def validate_main() -> None:
    """`launcher.py --validate`: the config on stdin; prints the refusal, exit 1 if refused."""
    reason = refusal(sys.stdin.read())
    print(reason or "ok", flush=True)
    sys.exit(1 if reason else 0)


def main() -> None:
    if sys.argv[1:2] == [VALIDATE]:
        validate_main()
    die_with_parent()
    limit = int(os.environ.get("PLEXUS_EXABGP_ASYNC_LIMIT", "0") or 0)
    if limit > 0:
        try:
            exabgp_module("reactor.asynchronous").ASYNC.LIMIT = limit
        except (ImportError, AttributeError):  # another ExaBGP layout: run it unchanged
            pass
    install_commands()
    sys.argv[0] = "exabgp"
    exabgp_module("application.main").main()


if __name__ == "__main__":
    main()

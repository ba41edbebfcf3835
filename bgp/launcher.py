"""Starts ExaBGP with a larger per-loop work budget for API commands.

ExaBGP runs scheduled API work in slices of `ASYNC.LIMIT` (50) steps per reactor loop,
and one bulk `announce attributes ... nlri` command takes one step per prefix, so 100,000
prefixes need 2,000 loops. Raising the slice (PLEXUS_EXABGP_ASYNC_LIMIT) lets a batch go
through in a few loops. Stdlib and ExaBGP only: ExaBGP's own `main` runs afterwards.
"""

import os
import select
import sys
import threading


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


def main() -> None:
    die_with_parent()
    limit = int(os.environ.get("PLEXUS_EXABGP_ASYNC_LIMIT", "0") or 0)
    if limit > 0:
        try:
            from exabgp.reactor.asynchronous import ASYNC
            ASYNC.LIMIT = limit
        except ImportError:  # another ExaBGP layout: run it unchanged
            pass
    from exabgp.application.main import main as exabgp_main

    sys.argv[0] = "exabgp"
    exabgp_main()


if __name__ == "__main__":
    main()

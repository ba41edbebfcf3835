"""Starts ExaBGP with a larger per-loop work budget for API commands.

ExaBGP runs scheduled API work in slices of `ASYNC.LIMIT` (50) steps per reactor loop,
and one bulk `announce attributes ... nlri` command takes one step per prefix, so 100,000
prefixes need 2,000 loops. Raising the slice (PLEXUS_EXABGP_ASYNC_LIMIT) lets a batch go
through in a few loops. Stdlib and ExaBGP only: ExaBGP's own `main` runs afterwards.
"""

import os
import sys


def main() -> None:
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

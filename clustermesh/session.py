"""The loop around an etcd session: whatever ends one, the next starts after a backoff.

The remote-cluster watcher and the clustermesh-apiserver both live by it. An expected
failure (etcd unreachable, a refused cluster-config) is reported as such; anything else is
a crash, reported with its traceback and backed off the same way, never spun on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from clustermesh.kvstore import KvError, kv_failures
from plexus.core.reconciler import Backoff


async def run_sessions(session: Callable[[], Awaitable[None]], *, backoff: Backoff,
                       failed: Callable[[Exception | str], None],
                       crashed: Callable[[BaseException], None],
                       started: Callable[[], None], progressed: Callable[[], bool],
                       ended: Callable[[], None],
                       expected: tuple[type[Exception], ...] = (KvError,)) -> None:
    """Run `session` until cancelled. `progressed` says whether the session that just ended
    got far enough (connected, synced) for the backoff to start over."""
    attempt = 0
    while True:
        started()
        crash = False
        try:
            await session()
        except expected as e:
            failed(e)
        except ExceptionGroup as eg:
            failures = kv_failures(eg)
            if failures is None:
                crash = True
                crashed(eg)
            else:
                failed("; ".join(sorted({str(e) for e in failures})))
        except Exception as e:
            crash = True
            crashed(e)
        finally:
            ended()
        # A session that crashes after it progressed must still back off, not spin.
        attempt = 1 if progressed() and not crash else attempt + 1
        await asyncio.sleep(backoff.delay(attempt))

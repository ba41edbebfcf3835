"""Run a program built from modules: start it, serve its API, stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from plexus.core.api import ApiServer
from plexus.core.module import App

log = logging.getLogger(__name__)


async def serve_until_signalled(app: App, server: ApiServer, ready: str, stopping: str = "") -> None:
    """Start `app`, then `server`; log `ready`; on SIGTERM/SIGINT log `stopping` and stop both."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        await server.start()
        log.info("%s", ready)
        await stop.wait()
        if stopping:
            log.info("%s", stopping)
    finally:
        await server.stop()
        await app.stop()

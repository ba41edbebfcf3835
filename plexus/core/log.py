"""Structured logging: `logging` everywhere, key=value fields on every line."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any


class Fields(logging.LoggerAdapter[logging.Logger]):
    """A logger that appends fixed fields, e.g. `Fields(log, remote="west")`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        return (f"{msg} {fields}" if fields else msg), kwargs

    def bind(self, **more: object) -> Fields:
        return Fields(self.logger, {**(self.extra or {}), **more})


def fields(name: str, **values: object) -> Fields:
    return Fields(logging.getLogger(name), values)


def setup(level: str = "info", *, prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s " + (f"[{prefix}] " if prefix else "") + "%(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

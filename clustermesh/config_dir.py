"""The clustermesh config directory: one file per remote cluster, named after it.

Read when it changes: inotify says so, and only files whose stat changed are read again.
Shared by the agent and KVStoreMesh.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asyncinotify import Inotify, Mask

from clustermesh.config import RemoteClusterFile, read_remote_cluster_file
from plexus.core.config import ConfigError

log = logging.getLogger(__name__)

MAX_CONFIG_FILE_BYTES = 64 * 1024  # a remote's file names endpoints and three paths
NOT_CLUSTER_FILES = (".crt", ".key", ".pem")  # certificates kept next to the files
# What makes the directory be read again: a file written, added, removed or renamed (a
# Kubernetes secret mount swaps a symlink), or the directory itself going.
DIR_EVENTS = (Mask.CLOSE_WRITE | Mask.MODIFY | Mask.ATTRIB | Mask.CREATE | Mask.DELETE
              | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF)
DIR_SETTLE = 0.02  # s: the events of one write arrive together
DIR_RETRY_WATCH = 5.0  # s between attempts to watch a directory that could not be


@dataclass(frozen=True)
class FileRead:
    """One cluster file as last read: its config, or why it is refused.

    `stamp` (inode, size, mtime, ctime) unchanged means the file is not read again."""

    stamp: tuple[int, int, int, int]
    config: RemoteClusterFile | None
    digest: str
    error: str
    ignored: tuple[str, ...] = ()  # keys Cilium accepts that Plexus does not use


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_cluster_file(path: Path, st: os.stat_result) -> FileRead:
    """Read and validate one file; any problem becomes the refusal's reason, never an error."""
    stamp = file_stamp(st)
    if st.st_size > MAX_CONFIG_FILE_BYTES:
        return FileRead(stamp, None, "", f"{path}: {st.st_size} bytes, over the limit of "
                                          f"{MAX_CONFIG_FILE_BYTES}")
    try:
        raw = path.read_bytes()
        raw.decode()
        cfg, ignored = read_remote_cluster_file(path)
    except UnicodeDecodeError as e:
        return FileRead(stamp, None, "", f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except ConfigError as e:
        return FileRead(stamp, None, "", str(e))
    except OSError as e:
        return FileRead(stamp, None, "", f"{path}: cannot read: {e.strerror or e}")
    except Exception as e:  # whatever the YAML parser makes of hostile bytes
        return FileRead(stamp, None, "", f"{path}: cannot be read: {type(e).__name__}: {e}"[:300])
    if ignored:
        log.warning("clustermesh config %s: ignoring %s (accepted as Cilium does, not used "
                    "by Plexus)", path, ", ".join(ignored))
    return FileRead(stamp, cfg, hashlib.sha256(raw).hexdigest(), "", ignored)



def list_cluster_files(d: Path) -> dict[str, list[tuple[Path, os.stat_result]]]:
    """Cluster name -> its files with their stat; stat only, nothing is read here."""
    found: dict[str, list[tuple[Path, os.stat_result]]] = {}
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name.endswith(NOT_CLUSTER_FILES):
            continue
        try:
            if not entry.is_file():
                continue
            st = entry.stat()
        except OSError:
            continue  # vanished meanwhile, or a dangling link: as if absent
        found.setdefault(entry.name.removesuffix(".yaml"), []).append((Path(entry.path), st))
    return found


async def follow_directory(d: Path, rescan: Callable[[], None], tick: float) -> None:
    """Call `rescan` whenever the kernel says `d` changed (inotify), never by reading files
    on a timer. While `d` is missing, or inotify refuses a watch, one stat of the directory
    per tick stands in. Runs until cancelled."""
    while True:
        try:
            with Inotify() as inotify:
                inotify.add_watch(d, DIR_EVENTS)
                rescan()  # what changed before the watch was set
                await _follow(inotify, rescan)
        except OSError as e:  # missing, or no inotify watch left: poll the directory
            log.debug("config dir %s not watched (%s): polling it", d, e)
            await _poll(d, rescan, tick)


async def _follow(inotify: Inotify, rescan: Callable[[], None]) -> None:
    inotify.sync_timeout = 0  # sync_get below takes what is queued, never waits
    gone = Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF
    while True:
        events = [await inotify.get()]
        # One write makes several events: gather the burst, then scan once.
        await asyncio.sleep(DIR_SETTLE)
        while (more := inotify.sync_get()) is not None:
            events.append(more)
        rescan()
        if any(e.mask & gone for e in events):
            return  # the directory went (its remotes with it): watch for it again


async def _poll(d: Path, rescan: Callable[[], None], tick: float) -> None:
    """One directory stat per tick, a rescan when it changed. Returns when a missing
    directory appears, or after a while to try the watch again."""
    def stamp() -> tuple[int, int, int, int] | None:
        try:
            return file_stamp(d.stat())
        except OSError:
            return None
    existed = stamp() is not None
    seen: tuple[int, int, int, int] | None = None
    for _ in range(max(1, int(DIR_RETRY_WATCH / tick))):
        now = stamp()
        if now != seen:
            seen = now
            rescan()
            if now is not None and not existed:
                return
        await asyncio.sleep(tick)

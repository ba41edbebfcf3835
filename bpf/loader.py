"""Compile and load the datapath with bcc; maps pinned by name so a restart adopts them.

The only module that imports bcc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PROGRAM = Path(__file__).parent / "programs" / "datapath.c"
BPF_FS_MAGIC = 0xCAFE4A11


class LoadError(Exception):
    pass


def _statfs_type(path: Path) -> int:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = StatFs()
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        raise LoadError(f"statfs {path}: {os.strerror(ctypes.get_errno())}")
    return int(buf.f_type) & 0xFFFFFFFF


def ensure_pin_dir(pin_dir: Path) -> None:
    """The pin dir must sit on a bpf filesystem, or pins would not outlive the agent."""
    root = pin_dir
    while not root.exists():
        root = root.parent
    if _statfs_type(root) != BPF_FS_MAGIC:
        raise LoadError(f"{root} is not a bpf filesystem (mount -t bpf bpf {root})")
    pin_dir.mkdir(parents=True, exist_ok=True)


def ip_u32(ip: str) -> int:
    """An IPv4 address as the kernel sees it in a u32 (network byte order in memory)."""
    return int(struct.unpack("=I", socket.inet_aton(ip))[0])


# struct ipcache_key and ipcache_value of datapath.c; addresses in network byte order
_IPCACHE_KEY = struct.Struct("=I4s")
_IPCACHE_LEAF = struct.Struct("=I4sI")


def u32_ip(v: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", v))


class Datapath:
    """The loaded program: its two tc functions and its pinned maps."""

    def __init__(self, pin_dir: Path) -> None:
        from bcc import BPF

        ensure_pin_dir(pin_dir)
        self.pin_dir = pin_dir
        text = PROGRAM.read_text()
        # -w: Debian's headers may be older than the running kernel; the UAPI we use is stable
        self.bpf = BPF(text=text, cflags=[f'-DPIN_DIR="{pin_dir}"', "-w"])
        self.from_pod = self.bpf.load_func("from_pod", BPF.SCHED_CLS)
        self.to_pod = self.bpf.load_func("to_pod", BPF.SCHED_CLS)
        self.ipcache: Any = self.bpf["ipcache"]
        self.policy: Any = self.bpf["policy"]
        self.enforce: Any = self.bpf["enforce"]
        self.counters: Any = self.bpf["counters"]
        log.info("datapath loaded, maps pinned in %s", pin_dir)

    # ---- ipcache --------------------------------------------------------------------
    def ipcache_set(self, prefix: str, identity: int, host_ip: str, flags: int) -> None:
        addr, _, length = prefix.partition("/")
        k = self.ipcache.Key(int(length or 32), ip_u32(addr))
        self.ipcache[k] = self.ipcache.Leaf(identity, ip_u32(host_ip) if host_ip else 0, flags)

    def ipcache_set_many(self, rows: Sequence[tuple[str, int, str, int]]) -> None:
        """`ipcache_set` of every row; the IPv4 ones in one BPF_MAP_UPDATE_BATCH syscall."""
        keys, leaves, n = bytearray(), bytearray(), 0
        for prefix, identity, host_ip, flags in rows:
            addr, _, length = prefix.partition("/")
            if ":" in addr:
                self.ipcache_set(prefix, identity, host_ip, flags)
                continue
            keys += _IPCACHE_KEY.pack(int(length or 32), socket.inet_aton(addr))
            leaves += _IPCACHE_LEAF.pack(identity, socket.inet_aton(host_ip) if host_ip else bytes(4), flags)
            n += 1
        if n:
            self.ipcache.items_update_batch((self.ipcache.Key * n).from_buffer(keys),
                                            (self.ipcache.Leaf * n).from_buffer(leaves))

    def ipcache_delete(self, prefix: str) -> None:
        addr, _, length = prefix.partition("/")
        try:
            del self.ipcache[self.ipcache.Key(int(length or 32), ip_u32(addr))]
        except KeyError:
            pass

    def ipcache_items(self) -> dict[str, tuple[int, str, int]]:
        return {f"{u32_ip(k.addr)}/{k.prefixlen}": (v.identity, u32_ip(v.host_ip) if v.host_ip else "",
                                                     v.flags)
                for k, v in self.ipcache.items()}

    # ---- policy ---------------------------------------------------------------------
    def policy_set(self, ifindex: int, identity: int, port: int, proto: int, direction: int,
                   action: int) -> None:
        k = self.policy.Key(ifindex, identity, port, proto, direction)
        self.policy[k] = self.policy.Leaf(action)

    def policy_delete(self, ifindex: int, identity: int, port: int, proto: int, direction: int) -> None:
        try:
            del self.policy[self.policy.Key(ifindex, identity, port, proto, direction)]
        except KeyError:
            pass

    def policy_items(self) -> list[tuple[int, int, int, int, int, int]]:
        return [(k.ifindex, k.identity, k.port, k.proto, k.direction, v.action)
                for k, v in self.policy.items()]

    def enforce_set(self, ifindex: int, direction: int) -> None:
        self.enforce[self.enforce.Key(ifindex, direction)] = self.enforce.Leaf(1)

    def enforce_delete(self, ifindex: int, direction: int) -> None:
        try:
            del self.enforce[self.enforce.Key(ifindex, direction)]
        except KeyError:
            pass

    def enforce_items(self) -> list[tuple[int, int]]:
        return [(k.ifindex, k.direction) for k in self.enforce.keys()]

    def open_flows(self, callback: Any) -> None:
        """Call `callback(event)` for every verdict the datapath reports (poll to deliver)."""
        table = self.bpf["flows"]

        def on_event(_cpu: int, data: Any, _size: int) -> None:
            e = table.event(data)
            callback({"ifindex": e.ifindex, "src": u32_ip(e.saddr), "dst": u32_ip(e.daddr),
                      "identity": e.identity, "sport": e.sport, "dport": e.dport,
                      "proto": e.proto, "direction": e.direction, "verdict": e.verdict})

        table.open_perf_buffer(on_event, page_cnt=64)

    def poll_flows(self, timeout_ms: int) -> None:
        self.bpf.perf_buffer_poll(timeout=timeout_ms)

    def counter_totals(self) -> dict[str, int]:
        out = {}
        for idx, name in ((0, "forwarded"), (1, "dropped")):
            out[name] = int(sum(self.counters[ctypes.c_uint32(idx)]))
        return out

"""Compile and load the datapath with bcc; maps pinned by name so a restart adopts them.

The only module that imports bcc.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PROGRAM = Path(__file__).parent / "programs" / "datapath.c"
BPF_FS_MAGIC = 0xCAFE4A11
# conntrack of datapath.c: how long an entry lives after its last packet, and its flags
CT_LIFETIME_S, CT_LIFETIME_TCP_S, CT_CLOSE_S = 60, 21600, 10
CT_REVNAT, CT_CLOSING = 1, 4  # a service connection's; a FIN or RST went by


def ct_lifetime(proto: int, flags: int) -> int:
    if flags & CT_CLOSING:
        return CT_CLOSE_S
    return CT_LIFETIME_TCP_S if proto == socket.IPPROTO_TCP else CT_LIFETIME_S


class LoadError(Exception):
    pass


def program_text(path: Path = PROGRAM) -> str:
    """The program with its local `#include "x.h"` files inlined: bcc rewrites map calls
    (`m.lookup()`) only in the text it is given, not in headers it includes."""
    return re.sub(r'^#include "([\w.]+)"$', lambda m: program_text(path.parent / m[1]),
                  path.read_text(), flags=re.MULTILINE)


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


def ip6_bytes(ip: str) -> bytes:
    """An address as the IPv6 map holds it: 16 bytes; an IPv4 address IPv4-mapped."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed


def bytes_ip6(raw: bytes, *, unmap: bool = False) -> str:
    addr = ipaddress.IPv6Address(bytes(raw))
    if unmap and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _u8x16(raw: bytes) -> Any:
    return (ctypes.c_ubyte * 16).from_buffer_copy(raw)


_PINNED = re.compile(r'BPF_TABLE_PINNED\("(\w+)",[^;]*?,\s*(\w+),\s*(\d+),\s*PIN_DIR\s*"/(\w+)"')
_MAP_TYPES = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11}
_BPF_OBJ_GET_INFO_BY_FD = 15
_SYS_BPF = 321  # x86_64


def _obj_info(fd: int, words: int) -> Any:
    """The start of the kernel's bpf_map_info or bpf_prog_info of `fd`, as u32 words."""
    info = (ctypes.c_uint32 * words)()
    attr = struct.pack("=IIQ", fd, ctypes.sizeof(info), ctypes.addressof(info))
    buf = ctypes.create_string_buffer(attr, 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, buf, 64) != 0:
        raise LoadError(f"object info of fd {fd}: {os.strerror(ctypes.get_errno())}")
    return info


def map_info(fd: int) -> tuple[int, int, int, int]:
    """The kernel's (type, key size, value size, max entries) of the map behind `fd`."""
    info = _obj_info(fd, 5)  # type, id, key_size, value_size, max_entries
    return info[0], info[2], info[3], info[4]


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind `fd` (what bpftool names it by)."""
    return int(_obj_info(fd, 2)[1])  # type, id


def stale_pins(bpf: Any, text: str, pin_dir: Path) -> list[tuple[str, Path, str]]:
    """The pinned maps whose type, key, value or size differ from what `text` declares."""
    stale = []
    for kind, name, max_entries, pin_name in _PINNED.findall(text):
        table = bpf[name]
        leaf = getattr(table, "sLeaf", table.Leaf)  # a per-CPU table's Leaf is one per CPU
        want = (_MAP_TYPES[kind], ctypes.sizeof(table.Key), ctypes.sizeof(leaf), int(max_entries))
        have = map_info(table.map_fd)
        if have != want:
            why = "type {} key {} value {} entries {}; now {} {} {} {}".format(*have, *want)
            stale.append((name, pin_dir / pin_name, why))
    return stale


_early: dict[Path, Future[Datapath]] = {}


def compile_early(pin_dir: Path) -> None:
    """Start building the datapath for `pin_dir` on a thread of its own now: compiling takes
    seconds, mostly in clang outside the GIL, and a host joining the mesh waits for it. The
    agent's bpf module then takes this one (`datapath`) instead of compiling again."""
    key = pin_dir.resolve()
    if key in _early:
        return
    done: Future[Datapath] = Future()

    def build() -> None:
        try:
            done.set_result(Datapath(pin_dir))
        except BaseException as e:  # the module reports it when it takes the result
            done.set_exception(e)

    _early[key] = done
    threading.Thread(target=build, name="bpf-compile", daemon=True).start()


def datapath(pin_dir: Path) -> Datapath:
    """The datapath for `pin_dir`: the one `compile_early` started, else compiled now."""
    early = _early.pop(pin_dir.resolve(), None)
    return early.result() if early is not None else Datapath(pin_dir)


class Datapath:
    """The loaded program: its tc functions (for link devices and L3 ones) and its pinned maps."""

    def __init__(self, pin_dir: Path) -> None:
        from bcc import BPF

        ensure_pin_dir(pin_dir)
        self.pin_dir = pin_dir
        text = program_text()
        # -w: Debian's headers may be older than the running kernel; the UAPI we use is stable
        cflags = [f'-DPIN_DIR="{pin_dir}"', "-w"]
        self.bpf = BPF(text=text, cflags=cflags)
        # bcc adopts a pinned map whatever its layout; one left by an older program whose key
        # or value changed would be read wrongly, so it is replaced by an empty one
        stale = stale_pins(self.bpf, text, pin_dir)
        if stale:
            for name, pin, why in stale:
                log.warning("pinned map %s was made by another version of the program (%s): "
                            "replaced by an empty one", name, why)
                pin.unlink(missing_ok=True)
            self.bpf.cleanup()
            self.bpf = BPF(text=text, cflags=cflags)
        self.from_pod = self.bpf.load_func("from_pod", BPF.SCHED_CLS)
        self.to_pod = self.bpf.load_func("to_pod", BPF.SCHED_CLS)
        # the same on an L3 device, whose packets start at the IP header
        self.from_pod_l3 = self.bpf.load_func("from_pod_l3", BPF.SCHED_CLS)
        self.to_pod_l3 = self.bpf.load_func("to_pod_l3", BPF.SCHED_CLS)
        # the egress gateway's NAT, on a gateway's uplink (programs/egress.h)
        self.egress_nat_out = self.bpf.load_func("egress_nat_out", BPF.SCHED_CLS)
        self.egress_nat_in = self.bpf.load_func("egress_nat_in", BPF.SCHED_CLS)
        # ... and on every node's egress tunnel device: only what it may forward
        self.egress_tunnel_in = self.bpf.load_func("egress_tunnel_in", BPF.SCHED_CLS)
        self.ipcache: Any = self.bpf["ipcache"]
        self.ipcache6: Any = self.bpf["ipcache6"]
        self.policy: Any = self.bpf["policy"]
        self.enforce: Any = self.bpf["enforce"]
        self.counters: Any = self.bpf["counters"]
        self.endpoint_alias: Any = self.bpf["endpoint_alias"]
        log.info("datapath loaded, maps pinned in %s", pin_dir)

    # ---- ipcache --------------------------------------------------------------------
    def ipcache_set(self, prefix: str, identity: int, host_ip: str, flags: int) -> None:
        addr, _, length = prefix.partition("/")
        if ":" in addr:
            return self._ipcache6_set(addr, int(length or 128), identity, host_ip, flags)
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
        if ":" in addr:
            return self._ipcache6_delete(addr, int(length or 128))
        try:
            del self.ipcache[self.ipcache.Key(int(length or 32), ip_u32(addr))]
        except KeyError:
            pass

    def ipcache_items(self) -> dict[str, tuple[int, str, int]]:
        return {f"{u32_ip(k.addr)}/{k.prefixlen}": (v.identity, u32_ip(v.host_ip) if v.host_ip else "",
                                                     v.flags)
                for k, v in self.ipcache.items()} | self._ipcache6_items()

    # IPv6 prefixes live in their own LPM trie; callers see one prefix namespace.
    def _ipcache6_set(self, addr: str, length: int, identity: int, host_ip: str, flags: int) -> None:
        k = self.ipcache6.Key(length, _u8x16(ip6_bytes(addr)))
        host = _u8x16(ip6_bytes(host_ip) if host_ip else bytes(16))
        self.ipcache6[k] = self.ipcache6.Leaf(identity, host, flags)

    def _ipcache6_delete(self, addr: str, length: int) -> None:
        try:
            del self.ipcache6[self.ipcache6.Key(length, _u8x16(ip6_bytes(addr)))]
        except KeyError:
            pass

    def _ipcache6_items(self) -> dict[str, tuple[int, str, int]]:
        out = {}
        for k, v in self.ipcache6.items():
            host = bytes(v.host_ip)
            out[f"{bytes_ip6(bytes(k.addr))}/{k.prefixlen}"] = (
                v.identity, bytes_ip6(host, unmap=True) if any(host) else "", v.flags)
        return out

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

    def alias_set(self, ifindex: int, endpoint: int) -> None:
        """Judge what passes `ifindex` (an L3 device) as `endpoint`'s interface does."""
        self.endpoint_alias[ctypes.c_uint32(ifindex)] = ctypes.c_uint32(endpoint)

    def alias_delete(self, ifindex: int) -> None:
        try:
            del self.endpoint_alias[ctypes.c_uint32(ifindex)]
        except KeyError:
            pass

    def enforce_set(self, ifindex: int, direction: int) -> None:
        self.enforce[self.enforce.Key(ifindex, direction)] = self.enforce.Leaf(1)

    def enforce_delete(self, ifindex: int, direction: int) -> None:
        try:
            del self.enforce[self.enforce.Key(ifindex, direction)]
        except KeyError:
            pass

    def enforce_items(self) -> list[tuple[int, int]]:
        return [(k.ifindex, k.direction) for k in self.enforce.keys()]

    # ---- conntrack ------------------------------------------------------------------
    def ct_items(self) -> list[tuple[int, int, str, str, int, int, int, int, int]]:
        """Every conntrack entry of both families: (ifindex, direction, source, destination,
        source port, destination port, protocol, last seen (CLOCK_MONOTONIC ns), flags)."""
        out = [(k.ifindex, k.direction, u32_ip(k.saddr), u32_ip(k.daddr), k.sport, k.dport, k.proto,
                v.seen, v.flags) for k, v in self.bpf["conntrack"].items()]
        out += [(k.ifindex, k.direction, bytes_ip6(bytes(k.saddr)), bytes_ip6(bytes(k.daddr)),
                 k.sport, k.dport, k.proto, v.seen, v.flags) for k, v in self.bpf["conntrack6"].items()]
        return out

    def open_flows(self, callback: Any, lost: Any = None, pages: int = 64) -> None:
        """Call `callback(event)` for every verdict the datapath reports, and `lost(count)`
        when the kernel's buffer overran (poll to deliver). `ts` is CLOCK_MONOTONIC ns."""
        table = self.bpf["flows"]

        def on_event(_cpu: int, data: Any, _size: int) -> None:
            e = table.event(data)
            callback({"ts": e.ts, "ifindex": e.ifindex, "src": u32_ip(e.saddr), "dst": u32_ip(e.daddr),
                      "identity": e.identity, "sport": e.sport, "dport": e.dport,
                      "proto": e.proto, "direction": e.direction, "verdict": e.verdict,
                      "tcp_flags": e.tcp_flags, "reason": e.reason,
                      **({"nat": (u32_ip(e.nat_addr), socket.ntohs(e.nat_port))}
                         if e.nat_addr else {})})

        table.open_perf_buffer(on_event, page_cnt=pages, lost_cb=lost)
        self._open_flows6(callback, lost)

    def _open_flows6(self, callback: Any, lost: Any) -> None:
        table = self.bpf["flows6"]

        def on_event(_cpu: int, data: Any, _size: int) -> None:
            e = table.event(data)
            callback({"ts": e.ts, "ifindex": e.ifindex, "src": bytes_ip6(bytes(e.saddr)),
                      "dst": bytes_ip6(bytes(e.daddr)), "identity": e.identity, "sport": e.sport,
                      "dport": e.dport, "proto": e.proto, "direction": e.direction,
                      "verdict": e.verdict, "tcp_flags": 0})

        table.open_perf_buffer(on_event, page_cnt=16, lost_cb=lost)

    def poll_flows(self, timeout_ms: int) -> None:
        self.bpf.perf_buffer_poll(timeout=timeout_ms)

    def counter_totals(self) -> dict[str, int]:
        """Packets forwarded and dropped, all CPUs summed."""
        drops = self.drop_reasons()
        return {"forwarded": self._counter(0), "dropped": sum(drops.values())}

    def drop_reasons(self) -> dict[str, int]:
        """Dropped packets by why (COUNT_* of datapath.c)."""
        return {"policy-denied": self._counter(1), "no-service-backend": self._counter(2),
                "no-egress-gateway": self._counter(3), "no-egress-port": self._counter(4)}

    def _counter(self, idx: int) -> int:
        return int(sum(self.counters[ctypes.c_uint32(idx)]))

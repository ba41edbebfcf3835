"""WireGuard's cross-platform userspace API (UAPI) over the device's unix socket.

Every line is built from typed values (bytes keys as hex, ints, IP networks), so nothing
from outside can add a line: `set` rejects any value with a control character.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

UAPI_DIR = Path("/var/run/wireguard")


class UapiError(Exception):
    pass


@dataclass
class PeerInfo:
    public_key: bytes
    endpoint: str = ""
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class DeviceInfo:
    private_key: bytes = b""
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerInfo] = field(default_factory=dict)


def socket_path(device: str) -> Path:
    return UAPI_DIR / f"{device}.sock"


def _line(key: str, value: str) -> str:
    if any(ord(c) < 0x20 or c == "=" for c in key) or any(ord(c) < 0x20 for c in value):
        raise UapiError(f"refusing a control character in {key}")
    return f"{key}={value}\n"


class Uapi:
    def __init__(self, device: str, timeout: float = 5.0) -> None:
        self.path = socket_path(device)
        self.timeout = timeout

    def exists(self) -> bool:
        return self.path.exists()

    def _exchange(self, request: str) -> list[str]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
            except OSError as e:
                raise UapiError(f"cannot reach {self.path}: {e.strerror or e}") from None
            s.sendall(request.encode())
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        lines = data.decode().strip("\n").split("\n")
        errno = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("errno=")), "0")
        if errno != "0":
            raise UapiError(f"{request.split(chr(10))[0]} failed: errno={errno}")
        return [ln for ln in lines if ln and not ln.startswith("errno=")]

    def get(self) -> DeviceInfo:
        info = DeviceInfo()
        peer: PeerInfo | None = None
        for ln in self._exchange("get=1\n\n"):
            key, _, value = ln.partition("=")
            if key == "private_key":
                info.private_key = bytes.fromhex(value)
            elif key == "listen_port":
                info.listen_port = int(value)
            elif key == "fwmark" and peer is None:
                info.fwmark = int(value)
            elif key == "public_key":
                peer = PeerInfo(bytes.fromhex(value))
                info.peers[peer.public_key] = peer
            elif peer is not None:
                if key == "endpoint":
                    peer.endpoint = value
                elif key == "allowed_ip":
                    peer.allowed_ips.append(value)
                elif key == "last_handshake_time_sec":
                    peer.last_handshake += int(value)
                elif key == "last_handshake_time_nsec":
                    peer.last_handshake += int(value) / 1e9
                elif key == "rx_bytes":
                    peer.rx_bytes = int(value)
                elif key == "tx_bytes":
                    peer.tx_bytes = int(value)
        return info

    def set_device(self, private_key: bytes, listen_port: int, fwmark: int = 0) -> None:
        self._exchange("set=1\n" + _line("private_key", private_key.hex())
                       + _line("listen_port", str(int(listen_port)))
                       + _line("fwmark", str(int(fwmark))) + "\n")

    def set_peer(self, public_key: bytes, endpoint: tuple[str, int],
                 allowed_ips: list[str], keepalive: int = 0) -> None:
        self.set_peers([(public_key, endpoint, allowed_ips, keepalive)])

    def set_peers(self, peers: list[tuple[bytes, tuple[str, int], list[str], int]]) -> None:
        """Configure many peers in one request (one transaction for wireguard-go)."""
        req = "set=1\n" + "".join(self._peer_lines(*p) for p in peers)
        self._exchange(req + "\n")

    @staticmethod
    def _peer_lines(public_key: bytes, endpoint: tuple[str, int], allowed_ips: list[str],
                    keepalive: int = 0) -> str:
        ip = ipaddress.ip_address(endpoint[0])
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        nets = [str(ipaddress.ip_network(n, strict=False)) for n in allowed_ips]
        req = _line("public_key", public_key.hex()) \
            + _line("endpoint", f"{host}:{int(endpoint[1])}") + _line("replace_allowed_ips", "true")
        req += "".join(_line("allowed_ip", n) for n in nets)
        if keepalive:
            req += _line("persistent_keepalive_interval", str(int(keepalive)))
        return req

    def remove_peer(self, public_key: bytes) -> None:
        self._exchange("set=1\n" + _line("public_key", public_key.hex()) + _line("remove", "true") + "\n")

"""Mutual TLS contexts from a CA, a certificate and its key; the peer's common name."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Serve with `cert`; refuse every client without a certificate issued by `ca`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Connect with `cert`; trust only servers whose certificate `ca` issued for their address."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def common_name(peercert: dict[str, Any] | None) -> str:
    """The subject CN of a certificate as `SSLSocket.getpeercert()` gives it ("" when none)."""
    for rdn in (peercert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return ""

"""WireGuard keys: X25519, stored 0600 in the state dir, published as base64."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

KEY_FILE = "wireguard.key"


class InvalidKey(ValueError):
    pass


def parse_public_key(text: str) -> bytes:
    """A peer's public key from a node record: 32 bytes in base64, nothing else."""
    if not isinstance(text, str) or len(text) != 44 or not text.isascii():
        raise InvalidKey("public key must be 44 base64 characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise InvalidKey("public key is not valid base64") from None
    if len(raw) != 32:
        raise InvalidKey("public key is not 32 bytes")
    X25519PublicKey.from_public_bytes(raw)  # rejects nothing of length 32, but states intent
    if raw == bytes(32):
        raise InvalidKey("public key is all zeroes")
    return raw


class KeyPair:
    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private

    @property
    def private_bytes(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_bytes).decode()

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / KEY_FILE
        tmp = state_dir / f".{KEY_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(self.private_bytes).decode() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load_or_create(cls, state_dir: Path) -> KeyPair:
        path = state_dir / KEY_FILE
        if path.exists():
            raw = base64.b64decode(path.read_text().strip(), validate=True)
            return cls(X25519PrivateKey.from_private_bytes(raw))
        pair = cls.generate()
        pair.save(state_dir)
        return pair

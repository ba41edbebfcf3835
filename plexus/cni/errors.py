"""CNI spec errors: a code, a message and details, printed as JSON on stdout."""

from __future__ import annotations

# Well-known codes from the CNI spec.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
# Plugin-specific codes start at 100.
IP_EXHAUSTED = 100
AGENT_UNAVAILABLE = 101
NETLINK_FAILURE = 102
AGENT_REFUSED = 103


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def as_dict(self, cni_version: str) -> dict[str, object]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg,
                "details": self.details}

    def __str__(self) -> str:
        return f"CNI error {self.code}: {self.msg}" + (f" ({self.details})" if self.details else "")

"""The kernel numbers features use: route tables, rule priorities, route protocols, fwmarks,
tc priorities and handles, address protocols (IFA_PROTO).

Each feature claims the numbers it writes with when its module is built, so two features
that would fight over one table or one rule priority fail at start, with a message naming
both, instead of pruning each other's state at run time. A number several features mean to
share (the route protocol that marks the agent's routes, each feature pruning only its own
table) is claimed `shared` by each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plexus.core.module import Hive, Key

KernelNumberKind = Literal["route-table", "rule-priority", "route-protocol", "fwmark",
                           "tc-priority", "tc-handle", "address-protocol"]


@dataclass(frozen=True)
class Claim:
    kind: KernelNumberKind
    number: int
    owner: str  # the module
    what: str   # what it uses the number for
    shared: bool = False

    def describe(self) -> str:
        return f"{self.owner} ({self.what})"


class KernelNumberClash(RuntimeError):
    """Two modules claim one kernel number; raised while the agent is built."""


class KernelNumbers:
    """Every claim of this agent, checked for clashes as it is made."""

    def __init__(self) -> None:
        self._claims: dict[tuple[KernelNumberKind, int], list[Claim]] = {}

    def claim(self, kind: KernelNumberKind, number: int, owner: str, what: str, *,
              shared: bool = False) -> Claim:
        new = Claim(kind, number, owner, what, shared)
        held = self._claims.setdefault((kind, number), [])
        for other in held:
            if other == new:
                return other  # the same claim made again (a module built twice in a test)
            if not (shared and other.shared):
                raise KernelNumberClash(
                    f"{kind} {number} is claimed by {other.describe()} and by {new.describe()}")
        held.append(new)
        return new

    def claims(self) -> list[Claim]:
        return sorted((c for held in self._claims.values() for c in held),
                      key=lambda c: (c.kind, c.number, c.owner))


KERNEL_NUMBERS: Key[KernelNumbers] = Key("kernel-numbers")


def kernel_numbers(hive: Hive) -> KernelNumbers:
    """The hive's registry; the first module that claims anything creates it."""
    return hive.optional(KERNEL_NUMBERS) or hive.provide(KERNEL_NUMBERS, KernelNumbers())

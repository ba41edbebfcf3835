"""User manifests: the table every cluster's manifests land in, the `metadata` every kind
shares, and the cache that keeps the last good version of each.

A manifest is applied with `plexus apply -f` and stored in etcd; the clustermesh watcher
writes it into the manifests table; each feature parses the kinds it owns through a
`ManifestCache`, so a bad new version is reported while the last good one keeps running.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field

from plexus.core.config import ConfigError, Strict, parse
from plexus.core.module import Key
from plexus.core.selectors import Labels
from plexus.core.tables import Table

ManifestKey = tuple[str, str, str, str]  # (cluster, kind, namespace, name)
KEEPING = " (keeping the last good version)"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

M = TypeVar("M", bound=Strict)
log = logging.getLogger(__name__)


def _name(v: str) -> str:
    if len(v) > 253 or not _NAME.match(v):
        raise ValueError(f"{v!r} is not a valid name (lower-case alphanumerics, '-', '.')")
    return v


Name = Annotated[str, AfterValidator(_name)]


class Metadata(Strict):
    """The `metadata` of every manifest kind, as in Kubernetes' ObjectMeta."""

    name: Name
    namespace: Name = "default"
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = Field(
        None, description="When the manifest was first stored: set by `plexus apply`, kept by "
                          "later applies (what \"the older one\" means between manifests).")


@dataclass(frozen=True)
class Manifest:
    """A user manifest applied with `plexus apply -f`, stored under `plexus/manifests/v1/`.

    `body` is the whole document; each feature validates the kinds it owns and reports
    a bad one in its status while it keeps running the last good one.
    """

    cluster: str
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]

    @property
    def key(self) -> ManifestKey:
        return (self.cluster, self.kind, self.namespace, self.name)

    @property
    def source(self) -> str:
        """How problems name it: where it is stored, below `plexus/manifests/v1/`."""
        return "/".join(self.key)


def manifests_table() -> Table[ManifestKey, Manifest]:
    return Table("manifests", key=lambda m: m.key, indexes={"cluster": lambda m: m.cluster})


MANIFESTS: Key[Table[ManifestKey, Manifest]] = Key("manifests")  # every cluster's


class ManifestCache:
    """The last good parsed version of every manifest of the kinds one feature owns.

    `sync` parses what is present now: a manifest that parses replaces its previous
    version; one that does not is reported in `problems` (naming the manifest and the
    field) while its last good version, if any, stays in `good`; one that is gone is
    forgotten. A rejection is logged once, when it first appears or changes.
    """

    def __init__(self, kinds: Mapping[str, type[Strict]], logger: logging.Logger = log) -> None:
        self.kinds = dict(kinds)
        self.log = logger
        self.good: dict[ManifestKey, Strict] = {}
        self.problems: dict[ManifestKey, str] = {}
        # the version each key was last parsed from: an unchanged manifest is not parsed
        # again, and its parsed object stays the same one (readers may keep what they
        # derived from it)
        self._read: dict[ManifestKey, Manifest] = {}
        self.generation = 0  # counts the syncs that changed what is parsed or rejected

    def sync(self, manifests: Iterable[Manifest]) -> None:
        present: set[ManifestKey] = set()
        problems: dict[ManifestKey, str] = {}
        for m in manifests:
            model = self.kinds.get(m.kind)
            if model is None:
                continue  # another feature's kind
            present.add(m.key)
            if self._read.get(m.key) == m:
                if m.key in self.problems:
                    problems[m.key] = self.problems[m.key]
                continue
            self._read[m.key] = m
            self.generation += 1
            try:
                self.good[m.key] = parse(model, m.body, m.source)
            except ConfigError as e:
                problems[m.key] = str(e) + (KEEPING if m.key in self.good else "")
        for key in self.good.keys() - present:
            del self.good[key]
        for key in self._read.keys() - present:
            del self._read[key]
            self.generation += 1
        for key, problem in problems.items():
            if self.problems.get(key) != problem:
                self.log.warning("manifest rejected: %s", problem)
        self.problems = problems

    def of(self, kind: str) -> list[Strict]:
        """The good manifests of one kind, in key order."""
        return [v for k, v in sorted(self.good.items(), key=lambda kv: kv[0]) if k[1] == kind]

    def parsed(self, model: type[M]) -> dict[ManifestKey, M]:
        """The good manifests parsed as `model`, by key, in key order."""
        return {k: v for k, v in sorted(self.good.items(), key=lambda kv: kv[0])
                if isinstance(v, model)}

"""The shared manifest layer: object metadata and the last-good-version cache."""

from __future__ import annotations

import logging
from typing import Any, Literal

import pytest

from plexus.core.config import ConfigError, Strict, parse
from plexus.core.manifests import Manifest, ManifestCache, Metadata


class Spec(Strict):
    port: int


class Thing(Strict):
    kind: Literal["Thing"]
    metadata: Metadata
    spec: Spec


class Other(Strict):
    kind: Literal["Other"]
    metadata: Metadata


KINDS: dict[str, type[Strict]] = {"Thing": Thing, "Other": Other}


def thing(name: str, port: Any, cluster: str = "east", kind: str = "Thing") -> Manifest:
    return Manifest(cluster, kind, "default", name,
                    {"kind": kind, "metadata": {"name": name}, "spec": {"port": port}})


@pytest.mark.parametrize(("metadata", "field"), [
    ({}, "metadata.name: required field is missing"),
    ({"name": "Web"}, "metadata.name: Value error, 'Web' is not a valid name"),
    ({"name": "a" * 254}, "metadata.name"),
    ({"name": "web", "namespace": "-x"}, "metadata.namespace"),
    ({"name": "web", "labels": {"app": "a b"}}, "metadata.labels"),
    ({"name": "web", "uid": "1"}, "metadata.uid: unknown field"),
])
def test_invalid_metadata_names_the_field(metadata: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(Other, {"kind": "Other", "metadata": metadata}, "other")
    assert f"other: {field}" in str(e.value)


def test_metadata_defaults_and_annotations() -> None:
    m = parse(Other, {"kind": "Other", "metadata": {"name": "web", "annotations": {"a/b": "x y"}}}, "m")
    assert (m.metadata.namespace, m.metadata.labels, m.metadata.annotations) == (
        "default", {}, {"a/b": "x y"})


def test_bad_new_version_keeps_the_last_good_one(caplog: pytest.LogCaptureFixture) -> None:
    cache = ManifestCache(KINDS)
    cache.sync([thing("a", 80), thing("b", 90)])
    assert [t.spec.port for t in cache.parsed(Thing).values()] == [80, 90]
    assert cache.problems == {}

    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # logged once, not on every sync
            cache.sync([thing("a", "x"), thing("b", 90)])
    (problem,) = cache.problems.values()
    assert problem.startswith("east/Thing/default/a: spec.port: ")
    assert problem.endswith("(keeping the last good version)")
    assert [r.message for r in caplog.records] == [f"manifest rejected: {problem}"]
    assert [t.spec.port for t in cache.parsed(Thing).values()] == [80, 90]

    cache.sync([thing("a", 81), thing("b", 90)])  # fixed
    assert cache.problems == {} and cache.parsed(Thing)[("east", "Thing", "default", "a")].spec.port == 81

    cache.sync([thing("b", 90)])  # deleted: forgotten
    assert list(cache.parsed(Thing)) == [("east", "Thing", "default", "b")]


def test_bad_first_version_has_nothing_to_keep() -> None:
    cache = ManifestCache(KINDS)
    cache.sync([thing("a", "x", cluster="west")])
    assert cache.good == {}
    assert cache.problems == {("west", "Thing", "default", "a"): (
        "west/Thing/default/a: spec.port: Input should be a valid integer, unable to parse string "
        "as an integer (got 'x')")}
    cache.sync([])
    assert cache.problems == {}


def test_only_its_kinds_by_kind_in_key_order() -> None:
    cache = ManifestCache(KINDS)
    other = Manifest("east", "Other", "default", "o", {"kind": "Other", "metadata": {"name": "o"}})
    cache.sync([thing("z", 1), other, thing("a", 2), thing("n", 3, kind="Unowned")])
    assert [t.metadata.name for t in cache.parsed(Thing).values()] == ["a", "z"]
    assert [m.metadata.name for m in cache.parsed(Other).values()] == ["o"] == [
        m.metadata.name for m in cache.of("Other") if isinstance(m, Other)]
    assert ("east", "Unowned", "default", "n") not in cache.good | cache.problems

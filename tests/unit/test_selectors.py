"""The one label selector: Kubernetes semantics, validation naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from plexus.core.config import ConfigError, parse
from plexus.core.selectors import LabelSelector

WEB = {"app": "web", "tier": "front"}
DB = {"app": "db"}
NONE: dict[str, str] = {}


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    e: dict[str, Any] = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ({}, WEB, True),                                       # empty selects everything
    ({}, NONE, True),
    ({"matchLabels": {"app": "web"}}, WEB, True),
    ({"matchLabels": {"app": "web"}}, DB, False),
    ({"matchLabels": {"app": "web"}}, NONE, False),
    ({"matchLabels": {"app": "web", "tier": "back"}}, WEB, False),  # every label must hold
    ({"matchExpressions": [expr("app", "In", "web", "api")]}, WEB, True),
    ({"matchExpressions": [expr("app", "In", "web", "api")]}, DB, False),
    ({"matchExpressions": [expr("app", "In", "web")]}, NONE, False),
    ({"matchExpressions": [expr("app", "NotIn", "web")]}, WEB, False),
    ({"matchExpressions": [expr("app", "NotIn", "web")]}, DB, True),
    ({"matchExpressions": [expr("app", "NotIn", "web")]}, NONE, True),  # no key: not in
    ({"matchExpressions": [expr("tier", "Exists")]}, WEB, True),
    ({"matchExpressions": [expr("tier", "Exists")]}, DB, False),
    ({"matchExpressions": [expr("tier", "DoesNotExist")]}, WEB, False),
    ({"matchExpressions": [expr("tier", "DoesNotExist")]}, DB, True),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [expr("tier", "DoesNotExist")]}, WEB, False),
    ({"matchExpressions": [expr("app", "In", "web", "db"), expr("tier", "NotIn", "front")]}, DB, True),
    ({"matchExpressions": [expr("app", "In", "web", "db"), expr("tier", "NotIn", "front")]}, WEB, False),
])
def test_matches(selector: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is matches


@pytest.mark.parametrize(("selector", "field", "why"), [
    ({"matchExpressions": [expr("app", "In")]}, "matchExpressions[0]", "operator In needs values"),
    ({"matchExpressions": [expr("app", "NotIn")]}, "matchExpressions[0]", "operator NotIn needs values"),
    ({"matchExpressions": [expr("app", "Exists", "x")]}, "matchExpressions[0]", "takes no values"),
    ({"matchExpressions": [expr("app", "DoesNotExist", "x")]}, "matchExpressions[0]", "takes no values"),
    ({"matchExpressions": [expr("app", "Has")]}, "matchExpressions[0].operator", "Input should be"),
    ({"matchExpressions": [expr("", "Exists")]}, "matchExpressions[0].key", "invalid label key"),
    ({"matchExpressions": [expr("a b", "Exists")]}, "matchExpressions[0].key", "invalid label key"),
    ({"matchExpressions": [expr("app", "In", "a;b")]}, "matchExpressions[0].values[0]",
     "invalid label value"),
    ({"matchExpressions": [{"key": "app"}]}, "matchExpressions[0].operator", "required field"),
    ({"matchLabels": {"-app": "web"}}, "matchLabels", "invalid label"),
    ({"matchLabels": {"app": "web app"}}, "matchLabels", "invalid label"),
    ({"matchLabel": {"app": "web"}}, "matchLabel", "unknown field"),
])
def test_invalid_selectors_name_the_field(selector: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(LabelSelector, selector, "sel")
    assert f"sel: {field}: " in str(e.value) and why in str(e.value)


def test_empty_label_value_is_valid() -> None:
    sel = parse(LabelSelector, {"matchLabels": {"edge": ""}}, "sel")
    assert sel.matches({"edge": ""}) and not sel.matches({"edge": "x"})


@pytest.mark.parametrize(("selector", "key", "mentioned"), [
    ({"matchLabels": {"app": "web"}}, "app", True),
    ({"matchExpressions": [expr("ns", "Exists")]}, "ns", True),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [expr("ns", "Exists")]}, "tier", False),
    ({}, "app", False),
])
def test_mentions(selector: dict[str, Any], key: str, mentioned: bool) -> None:
    assert LabelSelector.model_validate(selector).mentions(key) is mentioned

"""Label selectors with Kubernetes semantics, shared by every manifest that selects by labels.

`matchLabels` and every `matchExpressions` requirement must hold (AND). `In` and `NotIn`
need values; `Exists` and `DoesNotExist` take none. `NotIn` matches an object without the
key, as in Kubernetes. An empty selector selects everything.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from plexus.core.config import Strict

_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")


def _label_key(v: str) -> str:
    if not _LABEL.match(v):
        raise ValueError(f"invalid label key {v!r}")
    return v


def _label_value(v: str) -> str:
    if v and not _LABEL.match(v):
        raise ValueError(f"invalid label value {v!r}")
    return v


def _labels(v: dict[str, str]) -> dict[str, str]:
    for k, x in v.items():
        if not _LABEL.match(k) or (x and not _LABEL.match(x)):
            raise ValueError(f"invalid label {k!r}={x!r}")
    return v


LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, AfterValidator(_label_value)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]


class MatchExpression(Strict):
    """One requirement of a selector: `key` compared with `values` by `operator`."""

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> MatchExpression:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


class LabelSelector(Strict):
    """Kubernetes matchLabels plus matchExpressions (In, NotIn, Exists, DoesNotExist)."""

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: list[MatchExpression] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(e.matches(labels) for e in self.match_expressions)

    def mentions(self, key: str) -> bool:
        """True when any requirement of the selector is about `key`."""
        return key in self.match_labels or any(e.key == key for e in self.match_expressions)

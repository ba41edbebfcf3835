"""Typed configuration from YAML, validated once at start.

Every config is a pydantic model that forbids unknown keys. Errors name the file, the
field path and what was expected, e.g. `agent.yaml: bgp.peers[0].peerASN: Input should
be a valid integer (got 'x')`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config and manifest model: unknown keys are errors, values frozen.

    Fields are written snake_case in Python and camelCase in YAML, as Kubernetes does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=to_camel)


class ConfigError(ValueError):
    """A config or manifest problem, already phrased for the user."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p if p.startswith(source) else f"{source}: {p}"
                                   for p in problems))


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def describe(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        path = field_path(tuple(p for p in e["loc"] if not str(p).startswith("function-")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        problems.append(f"{path}: {msg}")
    return problems


def parse(model: type[M], data: Any, source: str) -> M:
    """Validate already-parsed data; raise ConfigError naming `source` and the fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, describe(e)) from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"]) from None


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return ConfigError(str(p), [f"{where}invalid YAML: {problem}"])


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        return yaml.safe_load(_read_text(p))
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None


def read_yaml_documents(path: str | Path) -> list[Any]:
    """Every non-empty document of a multi-document file (manifests)."""
    p = Path(path)
    try:
        return [d for d in yaml.safe_load_all(_read_text(p)) if d is not None]
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None


def load(model: type[M], path: str | Path) -> M:
    return parse(model, read_yaml(path), str(path))

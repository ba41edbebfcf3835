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


def _input_path(loc: tuple[int | str, ...], data: Any, missing: bool) -> tuple[int | str, ...]:
    """The parts of `loc` that name a field or an index of `data`.

    pydantic puts validator and union-member tags in `loc` (`function-after[...]`,
    `lax-or-strict[...]`, a member's type name); they are not where the user wrote anything.
    """
    kept: list[int | str] = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif missing and i == len(loc) - 1 and isinstance(cur, dict):
            pass  # the field that is missing
        elif data is not None or "[" in str(part) or str(part).startswith("function-"):
            continue
        kept.append(part)
    return tuple(kept)


def describe(err: ValidationError, data: Any = None) -> list[str]:
    """One line per field in words; the failed alternatives of a union share one line."""
    by_path: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for e in err.errors(include_url=False):
        path = field_path(_input_path(tuple(e["loc"]), data, e["type"] == "missing"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            got[path] = f" (got {e['input']!r})"
        if msg not in by_path.setdefault(path, []):
            by_path[path].append(msg)
    return [f"{path}: {_either(msgs)}{got.get(path, '')}" for path, msgs in by_path.items()]


def _either(msgs: list[str]) -> str:
    """`Input is not a valid IPv4 address` + `... IPv6 address` -> `... IPv4 address or IPv6 address`."""
    if len(msgs) == 1:
        return msgs[0]
    for lead in ("Input is not a valid ", "Input should be a valid ", "Input should be "):
        if all(m.startswith(lead) for m in msgs):
            return lead + " or ".join(m[len(lead):] for m in msgs)
    return "; or ".join(msgs)


def parse(model: type[M], data: Any, source: str) -> M:
    """Validate already-parsed data; raise ConfigError naming `source` and the fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, describe(e, data)) from None


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

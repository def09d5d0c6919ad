"""YAML + `--set a.b=value` overrides -> one validated pydantic config, with every problem reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """Bad configuration: the message lists every problem with its field path and how to fix it."""


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set teacher.checkpoint=t.pt")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return [p for p in key.strip().split(".") if p], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return data


def format_validation_error(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (typo? see `--help` or the example configs)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {prefix}{loc}: {msg}")
    return f"{len(lines)} problem(s) in the {prefix.rstrip('.') or 'config'} config:\n" + "\n".join(lines)


def load_config(model: type[M], path: Path | None, overrides: list[str], section: str) -> M:
    """Build a stage config. A file may hold the stage's fields at top level or under a `section:` key
    (so one pipeline YAML serves every command)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if section in data and section not in model.model_fields and isinstance(data[section], dict):
        data = dict(data[section])
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{section}.")) from None

"""YAML + `--set a.b=value` overrides -> one validated pydantic config, with every problem reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from distill.core.errors import InputError

M = TypeVar("M", bound=BaseModel)


class ConfigError(InputError):
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
    """Set each `a.b.c=value`; a number indexes into a list (`variants.1.temperature=3`: the second variant)."""
    for item in overrides:
        path, value = parse_override(item)
        if not path:
            raise ConfigError(f"--set {item!r}: no field named before '='")
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, path[:depth + 1], item)]
                continue
            if not isinstance(node.get(part), dict | list):
                if path[depth + 1].lstrip("-").isdigit():
                    raise ConfigError(f"--set {item!r}: there is no list '{'.'.join(path[:depth + 1])}' in the config "
                                      "to index; write the list in the YAML file first")
                node[part] = {}
            node = node[part]
        if isinstance(node, list):
            node[_list_index(node, path[-1], path, item)] = value
        else:
            node[path[-1]] = value
    return data


def _list_index(items: list, part: str, at: list[str], item: str) -> int:
    """`part` as an index into `items` (negative counts from the end), or a ConfigError saying what exists."""
    where = ".".join(at[:-1])
    try:
        i = int(part)
    except ValueError:
        raise ConfigError(f"--set {item!r}: {where} is a list; index it with a number (0..{len(items) - 1}), "
                          f"not '{part}'") from None
    if not -len(items) <= i < len(items):
        raise ConfigError(f"--set {item!r}: {where} has {len(items)} entries (indices 0..{len(items) - 1}); "
                          f"{i} is out of range: add the entry in the YAML file") from None
    return i


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

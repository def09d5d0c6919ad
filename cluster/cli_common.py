"""Pieces every `distill` subcommand shares: exit codes, the user-error set, --config/--set options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cluster.config_loading import ConfigError

EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_FAILURE, EXIT_LOCKED = 2, 3, 4, 5
EXIT_RUN_FAILED = 6  # the run started (work may be saved) and then failed; re-running resumes
STATUS_EXIT = {"success": 0, "partial": EXIT_PARTIAL, "failure": EXIT_FAILURE}


# (module, class) of every "your input is wrong" exception. Imported lazily and one by one: a stage whose
# dependencies are missing on this host (onnxruntime, torch_pruning for compress) must not turn every exit of
# the other stages into a ModuleNotFoundError.
_USER_ERRORS = (
    ("compress.onnx_export", "ParityError"),
    ("compress.prune", "PruningError"),
    ("teacher_cache.manifest", "CacheLockedError"),
    ("core.models", "UnknownModelError"),
    ("core.ray_cluster", "ClusterConnectionError"),
    ("teacher_cache.reader", "CacheError"),
    ("teacher_cache.schema", "SchemaError"),
    ("teacher_cache.teacher", "TeacherLoadError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'your input is wrong': printed as one line, exit 2, no traceback.

    A module that cannot be imported here cannot have raised its error either, so it is left out.
    """
    import importlib

    found: list[type[BaseException]] = [ConfigError]
    for module, name in _USER_ERRORS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return (*found, FileNotFoundError, ValueError)


def ray_overrides(no_ray: bool, address: str | None) -> list[str]:
    """--no-ray / --address as the --set overrides they stand for."""
    return (["ray.enabled=false"] if no_ray else []) + ([f"ray.address={address}"] if address else [])


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config FILE.yaml and repeatable --set a.b=value on every stage command."""

    @click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), default=None,
                  help="YAML config (the stage's fields at top level, or under a section named after the stage).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override one config field (repeatable), e.g. --set teacher.checkpoint=t.pt")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper



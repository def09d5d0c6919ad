"""Pieces every `distill` subcommand shares: exit codes, the user-error set, --config/--set options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from distill.cluster.config_loading import ConfigError

EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_FAILURE, EXIT_LOCKED = 2, 3, 4, 5
EXIT_RUN_FAILED = 6  # the run started (work may be saved) and then failed; re-running resumes
STATUS_EXIT = {"success": 0, "partial": EXIT_PARTIAL, "failure": EXIT_FAILURE}


class StageFailedError(RuntimeError):
    """A stage ran and every one of its units failed (all shards, all variants): exit 4 with one line."""


# (module, class) of every "your input is wrong" exception. Imported lazily and one by one: a stage whose
# dependencies are missing on this host (onnxruntime, torch_pruning for compress) must not turn every exit of
# the other stages into a ModuleNotFoundError.
_USER_ERRORS = (
    ("distill.compress.onnx_export", "ParityError"),
    ("distill.compress.prune", "PruningError"),
    ("distill.teacher_cache.manifest", "CacheLockedError"),
    ("distill.core.models", "UnknownModelError"),
    ("distill.core.ray_cluster", "ClusterConnectionError"),
    ("distill.teacher_cache.reader", "CacheError"),
    ("distill.teacher_cache.schema", "SchemaError"),
    ("distill.teacher_cache.teacher", "TeacherLoadError"),
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


def exit_for(exc: Exception, work_begun: bool) -> tuple[int, str] | None:
    """(exit code, the line to print) for an error that reached the CLI; None: a bug, keep its traceback.

    The rule: "bad input" (2) only before the command's work began (core/run_phase.py); after that any error is
    "failed during the run" (6: finished work is kept, a re-run continues). A stage whose every unit failed is 4,
    another writer holding the cache is 5, wherever they happen.
    """
    from distill.teacher_cache.manifest import CacheLockedError

    if isinstance(exc, CacheLockedError):
        return EXIT_LOCKED, f"refused: {exc}"
    if isinstance(exc, StageFailedError):
        return EXIT_FAILURE, f"error: {exc}"
    if not work_begun:
        return (EXIT_BAD_INPUT, f"error: {exc}") if isinstance(exc, user_errors()) else None
    return EXIT_RUN_FAILED, (f"error: failed during the run: {exc.__class__.__name__}: {exc} (finished work is "
                             "kept; re-run the same command to continue; --log-level DEBUG shows the traceback)")


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



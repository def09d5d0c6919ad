"""Pieces every `distill` subcommand shares: exit codes, the user-error set, --config/--set options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from distill.core.errors import DistillError, is_user_input

EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_FAILURE, EXIT_LOCKED = 2, 3, 4, 5
EXIT_RUN_FAILED = 6  # the run started (work may be saved) and then failed; re-running resumes
STATUS_EXIT = {"success": 0, "partial": EXIT_PARTIAL, "failure": EXIT_FAILURE}


class StageFailedError(DistillError, RuntimeError):
    """A stage ran and every one of its units failed (all shards, all variants): exit 4 with one line."""

    exit_code = 4


def exit_for(exc: Exception, work_begun: bool) -> tuple[int, str] | None:
    """(exit code, the line to print) for an error that reached the CLI; None: a bug, keep its traceback.

    The rule (core/errors.py): an error whose class fixes its code (`exit_code`: another writer holds the cache 5,
    a stage whose every unit failed 4) gets it wherever it happens; otherwise "bad input" (2) only before the
    command's work began (core/run_phase.py) and only for user input (`DistillError.user_input`, ValueError,
    FileNotFoundError); after the work began any error is "failed during the run" (6: finished work is kept, a
    re-run continues).
    """
    code = exc.exit_code if isinstance(exc, DistillError) else None
    if code is not None:
        return code, f"{'refused' if code == EXIT_LOCKED else 'error'}: {exc}"
    if not work_begun:
        return (EXIT_BAD_INPUT, f"error: {exc}") if is_user_input(exc) else None
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



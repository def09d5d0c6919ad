"""The project's exceptions share one base, and the base says what the CLI does with them.

`DistillError.user_input` marks "your input is wrong" (a config value, a file, a shard, a checkpoint, a cache that
does not fit): raised before a command's work began, the CLI prints its one line and exits 2, nothing done
(core/run_phase.py). Any other error before the work began is a bug and keeps its traceback (exit 1); after the work
began every error is "failed during the run" (exit 6: what finished is kept, a re-run continues). `exit_code` fixes
the code whatever the phase (another writer holds the cache: 5; every unit of a stage failed: 4).

Python's own `ValueError` and `FileNotFoundError` count as user input too (pydantic's validation errors are
ValueErrors), so the classes below that are user input are also ValueErrors and old `except ValueError` still
catches them.
"""

from __future__ import annotations

from typing import ClassVar


class DistillError(Exception):
    """Base of every error the project raises on purpose; its message says what is wrong and how to fix it."""

    user_input: ClassVar[bool] = False
    exit_code: ClassVar[int | None] = None


class InputError(DistillError, ValueError):
    """The user's input is wrong (config, files, data, models): exit 2 when found before the work began."""

    user_input = True


def is_user_input(exc: BaseException) -> bool:
    """The exit-code rule's question: does this error mean "bad input" (exit 2 before the work began)?"""
    if isinstance(exc, DistillError):
        return exc.user_input
    return isinstance(exc, (ValueError, FileNotFoundError))

"""`distill`: one subcommand per stage. Each validates its whole config before doing any work.

Exit codes: 0 success, 2 bad input/config (nothing was done), 3 partial (some shards/variants failed),
4 failure (nothing succeeded).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any `import ray`: loopback listeners

import functools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from cluster.config_loading import ConfigError  # noqa: E402

EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_FAILURE = 2, 3, 4
STATUS_EXIT = {"success": 0, "partial": EXIT_PARTIAL, "failure": EXIT_FAILURE}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'your input is wrong': printed as one line, exit 2, no traceback."""
    from teacher_cache.manifest import CacheLockedError
    from teacher_cache.models import UnknownModelError
    from teacher_cache.reader import CacheError
    from teacher_cache.schema import SchemaError
    from teacher_cache.teacher import TeacherLoadError

    return (ConfigError, TeacherLoadError, UnknownModelError, CacheError, SchemaError, CacheLockedError,
            FileNotFoundError, ValueError)


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


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except user_errors() as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def cli(log_level: str) -> None:
    """Distill one expensive vision teacher into many small students, with an offline teacher cache.

    \b
    Pipeline:  shards -> cache (teacher once, Parquet soft labels) -> train (students) -> compress -> deploy
    Configs:   every command takes --config FILE.yaml and --set a.b=value; see examples/.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _register() -> None:
    from cluster.cmd_cache import cache
    from cluster.cmd_shards import shards

    cli.add_command(shards)
    cli.add_command(cache)


_register()


def main() -> None:
    cli(prog_name="distill")


if __name__ == "__main__":
    main()

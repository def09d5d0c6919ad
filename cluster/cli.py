"""`distill`: one subcommand per stage. Each validates its whole config before doing any work.

Exit codes: 0 success, 2 bad input/config (found before any work; nothing was done), 3 partial (some
shards/variants failed), 4 failure (every shard/variant of a stage failed), 5 locked by another writer,
6 failed during the run (after work began; finished work is kept, re-run continues), 143 stopped by SIGTERM
(`ray job stop`; finished work is kept, re-run continues). An error is printed as one line, without a traceback;
only an unexpected error before any work began keeps its traceback (exit 1: a bug to report).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before any `import ray`: loopback listeners

import logging
import sys
from typing import Any

import click

from distill.cluster.cli_common import exit_for

log = logging.getLogger("distill")


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from distill.core.graceful_stop import EXIT_STOPPED, StopRequested, install_sigterm_handler, sigterm_received
        from distill.core.run_phase import reset_work, work_begun

        install_sigterm_handler()
        reset_work()
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors, --help, Ctrl-C at a prompt: click's own handling
        except (StopRequested, Exception) as exc:
            if sigterm_received():  # whatever form the interruption took on its way up
                click.echo("stopped by SIGTERM: finished work is kept (cache shards in the manifest, variants' epoch "
                           "checkpoints); re-run or re-submit the same command to continue", err=True)
                sys.exit(EXIT_STOPPED)
            outcome = exit_for(exc, work_begun()) if isinstance(exc, Exception) else None
            if outcome is None:
                raise
            log.debug("the error in full", exc_info=exc)
            click.echo(outcome[1], err=True)
            sys.exit(outcome[0])


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
    from distill.cluster.cmd_cache import cache
    from distill.cluster.cmd_compress import compress
    from distill.cluster.cmd_deploy import deploy, serve
    from distill.cluster.cmd_pipeline import pipeline
    from distill.cluster.cmd_shards import shards
    from distill.cluster.cmd_train import train

    cli.add_command(shards)
    cli.add_command(cache)
    cli.add_command(train)
    cli.add_command(compress)
    cli.add_command(deploy)
    cli.add_command(serve)
    cli.add_command(pipeline)


_register()


def main() -> None:
    cli(prog_name="distill")


if __name__ == "__main__":
    main()

"""`distill cache` (label shards with the teacher once) and `distill cache inspect`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from cluster.cli_common import STATUS_EXIT, config_options
from cluster.config_loading import load_config
from cluster.metrics_server import start_metrics_server

log = logging.getLogger(__name__)


@click.group(invoke_without_command=True)
@config_options
@click.option("--no-ray", is_flag=True, help="Label every shard in this process (same code path, no Ray).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster).")
@click.pass_context
def cache(ctx: click.Context, config_path: Path | None, overrides: tuple[str, ...], no_ray: bool,
          address: str | None) -> None:
    """Run the teacher ONCE over the shards and write sparse soft labels to Parquet (incremental).

    \b
    Output: <cache_root>/<fingerprint>/<shard>.parquet + manifest.json + errors/ + last_run.json.
    Unchanged shards (same size+mtime, or same content hash) with the same teacher are skipped.
    Exit: 0 all shards cached, 3 some shards failed, 4 all failed, 2 bad config/input.
    Example: distill cache --config examples/demo.yaml --set ray.num_actors=2
    """
    if ctx.invoked_subcommand is not None:
        return
    from teacher_cache.config import CacheConfig
    from teacher_cache.run import run

    sets = list(overrides) + (["ray.enabled=false"] if no_ray else []) + ([f"ray.address={address}"] if address else [])
    cfg = load_config(CacheConfig, config_path, sets, "cache")
    if cfg.metrics.enabled:
        start_metrics_server(cfg.metrics.host, cfg.metrics.port)
    result = run(cfg)
    summary = result.summary()
    click.echo(json.dumps({k: summary[k] for k in ("status", "cache_dir", "fingerprint", "images", "decode_errors",
                                                   "seconds")}
                          | {"labelled": len(result.labelled), "unchanged": len(result.unchanged),
                             "failed": result.failed, "vanished": result.vanished}, indent=1))
    if result.failed:
        click.echo(f"{len(result.failed)} shard(s) failed; the others are cached. Fix or remove them and re-run:",
                   err=True)
        for stem, msg in result.failed.items():
            click.echo(f"  {stem}: {msg}", err=True)
    sys.exit(STATUS_EXIT[result.status])


@cache.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification of the Parquet files.")
def inspect(directory: Path, as_json: bool, no_verify: bool) -> None:
    """Summarise a cache: rows, shards, views, k, bytes per sample-view, top-k mass, teacher accuracy, errors.

    DIRECTORY is a fingerprint directory or a cache root (the newest fingerprint is used).
    """
    from teacher_cache.inspect_cache import format_inspect, inspect_cache

    info = inspect_cache(directory, verify=not no_verify)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))

"""`distill cache` (label shards with the teacher once) and `distill cache inspect`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from distill.cluster.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_RUN_FAILED,
    STATUS_EXIT,
    config_options,
    ray_overrides,
)
from distill.cluster.config_loading import load_config
from distill.core.metrics_server import start_metrics_server

if TYPE_CHECKING:
    from distill.teacher_cache.config import CacheConfig

log = logging.getLogger(__name__)


WAIT_HELP = "Wait for a running writer of this cache instead of exiting (code 5)."


@click.group(invoke_without_command=True)
@config_options
@click.option("--wait", is_flag=True, help=WAIT_HELP)
@click.option("--no-ray", is_flag=True, help="Label every shard in this process (same code path, no Ray).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster).")
@click.pass_context
def cache(ctx: click.Context, config_path: Path | None, overrides: tuple[str, ...], wait: bool, no_ray: bool,
          address: str | None) -> None:
    """Run the teacher ONCE over the shards and write sparse soft labels to Parquet (incremental).

    \b
    Output: <cache_root>/<fingerprint>/<shard>-<sha16>.parquet + manifest.json (+ its journal while a run is on) +
    errors/ + last_run.json.
    Unchanged shards (same size+mtime+ctime+inode, or same content hash) with the same teacher are skipped.
    --set features.enabled=true also stores the teacher's penultimate embedding per view (schema v2, feature
    KD; features.dim=D projects it down with a seeded random matrix): a different fingerprint directory.
    Exit: 0 all shards cached, 3 some shards failed, 4 all failed, 2 bad config/input (nothing done),
    5 locked by another writer (--wait waits for it instead), 6 failed during the run (finished shards kept;
    re-run continues; also when this run lost its object-store lock),
    143 stopped by SIGTERM, e.g. `ray job stop` (last_run.json says "stopped" and what was done; re-run continues).
    Example: distill cache --config examples/demo.yaml --set ray.num_actors=2
    """
    if ctx.invoked_subcommand is not None:
        return
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    sets = list(overrides) + ray_overrides(no_ray, address)
    cfg = load_config(CacheConfig, config_path, sets, "cache")
    _check_address(cfg)
    _start_metrics(cfg)
    result = _run_or_exit(run, cfg, wait_for_lock=wait)
    summary = result.summary()
    click.echo(json.dumps({k: summary[k] for k in ("status", "cache_dir", "fingerprint", "images", "decode_errors",
                                                   "seconds")}
                          | {"labelled": len(result.labelled), "unchanged": len(result.unchanged),
                             "failed": result.failed, "vanished": result.vanished,
                             "teacher_top1": result.teacher_top1, "labelled_rows": result.labelled_rows}
                          | ({"retried": result.retried, "lost_nodes": result.lost_nodes} if result.retried else {}),
                          indent=1))
    if result.failed:
        click.echo(failed_shards_line(len(result.failed), len(result.labelled)), err=True)
        for stem, msg in result.failed.items():
            click.echo(f"  {stem}: {msg}", err=True)
    sys.exit(STATUS_EXIT[result.status])


def failed_shards_line(failed: int, labelled: int) -> str:
    """What the run cached beside its failed shards, in words that are true when nothing was."""
    if labelled == 0:
        return (f"{failed} shard(s) failed and none was labelled in this run: nothing new is cached. Fix or remove "
                "them and re-run:")
    return (f"{failed} shard(s) failed; the other {labelled} labelled in this run are cached. Fix or remove the "
            "failed ones and re-run:")


def _start_metrics(cfg: CacheConfig) -> None:
    """Before the lock and before any work: a taken fixed port is a config error, said in one line."""
    if not cfg.metrics.enabled:
        return
    try:
        start_metrics_server(cfg.metrics.host, cfg.metrics.port, cfg.metrics.targets_file)
    except OSError as exc:
        click.echo(f"error: cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: port {cfg.metrics.port} "
                   f"is already in use or not allowed ({exc.strerror or exc}); set metrics.port=0 (any free "
                   "port) or another port, or metrics.enabled=false", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _run_or_exit(run: Callable[..., Any], cfg: CacheConfig, **kw: Any) -> Any:
    """A failure after the run began exits 6 with one line (exit 2 is only for 'bad input, nothing done');
    another writer holding the cache exits 5, naming it."""
    from distill.teacher_cache.manifest import CacheLockedError
    from distill.teacher_cache.run import RunFailedError

    try:
        return run(cfg, **kw)
    except RunFailedError as exc:
        click.echo(f"error: the cache run failed during the run: {exc}", err=True)
        sys.exit(EXIT_RUN_FAILED)
    except CacheLockedError as exc:
        click.echo(f"refused: {exc}; to wait for it instead, run the same command with --wait", err=True)
        sys.exit(EXIT_LOCKED)


def _check_address(cfg: CacheConfig) -> None:
    """A named cluster must be reachable before any work, even on a run that turns out to be a no-op."""
    import os

    from distill.core.ray_cluster import check_address

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if cfg.ray.enabled and address:
        check_address(address)


@cache.command()
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification of the Parquet files.")
def inspect(directory: str, as_json: bool, no_verify: bool) -> None:
    """Summarise a cache: rows, shards, views, k, bytes per sample-view (with and without the teacher-feature
    column), feature dim/projection, top-k mass, teacher accuracy, errors, and the shards the last run could not
    label (in last_run.json's `failed`, with the reason; they are not cached).

    DIRECTORY is a fingerprint directory or a cache root (the newest fingerprint is used); an s3:// cache root
    is mirrored to ~/.cache/distill/mirror/.../<fingerprint>/<manifest version> first ($DISTILL_MIRROR_DIR).
    Rows, labels and teacher accuracy come from the manifest (no file is decoded for caches written by this
    build); --no-verify also skips the checksums.
    """
    from distill.teacher_cache.inspect_cache import format_inspect, inspect_cache

    info = inspect_cache(directory, verify=not no_verify)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


@cache.command()
@config_options
@click.option("--wait", is_flag=True, help=WAIT_HELP)
@click.option("--no-ray", is_flag=True, help="Label every shard in this process (same code path, no Ray).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster).")
def refresh(config_path: Path | None, overrides: tuple[str, ...], wait: bool, no_ray: bool,
            address: str | None) -> None:
    """Nightly incremental refresh: label new/changed shards only; safe to schedule.

    \b
    A lock guarantees one writer per cache: an overlapping run exits with code 5 and says who holds it
    (or waits with --wait). Prints a summary (shards new/changed/unchanged/vanished/failed, duration) and
    pushes it to metrics.pushgateway when set. Exit: 0 success, 3 partial, 4 failure, 5 locked,
    2 bad config/input (nothing done), 6 failed during the run (finished shards kept; re-run continues),
    143 stopped by SIGTERM.
    Example: distill cache refresh --config examples/demo.yaml --set metrics.pushgateway=http://127.0.0.1:9091
    """
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.metrics import push_refresh_summary
    from distill.teacher_cache.run import run

    cfg = load_config(CacheConfig, config_path, list(overrides) + ray_overrides(no_ray, address), "cache")
    _check_address(cfg)
    _start_metrics(cfg)
    result = _run_or_exit(run, cfg, wait_for_lock=wait)
    s = result.summary()
    click.echo(json.dumps({"status": s["status"], "cache_dir": s["cache_url"] or s["cache_dir"], "new": len(s["new"]),
                           "changed": len(s["changed"]), "unchanged": len(s["unchanged"]), "touched": s["touched"],
                           "vanished": s["vanished"], "failed": s["failed"], "images": s["images"],
                           "teacher_top1": s["teacher_top1"], "labelled_rows": s["labelled_rows"],
                           "seconds": round(s["seconds"], 2)}, indent=1))
    if cfg.metrics.pushgateway:
        try:
            push_refresh_summary(cfg.metrics.pushgateway, s)
        except OSError as exc:
            click.echo(f"warning: could not push the summary to {cfg.metrics.pushgateway}: {exc}", err=True)
    sys.exit(STATUS_EXIT[result.status])

"""`distill pipeline`: the whole chain from one YAML, each stage skipping what is current."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from distill.cluster.cli_common import EXIT_PARTIAL, EXIT_RUN_FAILED, config_options
from distill.cluster.config_loading import load_config

if TYPE_CHECKING:
    from distill.cluster.pipeline import PipelineConfig


@click.command()
@config_options
def pipeline(config_path: Path | None, overrides: tuple[str, ...]) -> None:
    """Run shards -> teacher -> cache -> train -> compress -> deploy from one YAML (a section per stage).

    \b
    Re-running after a failure or a kill continues: shards are kept when current, finished variants are
    skipped, interrupted ones resume from their last epoch, the cache only labels new/changed shards.
    At the end it prints each distilled student against its undistilled twin (best first) and the winner,
    then where the artefacts are, then the stage summaries as JSON.
    Exit: 0 every stage complete, 3 a stage was partial (some shards/variants failed; the later stages ran on
    the rest), 4 a stage failed for every shard/variant (the pipeline stops there), 2 bad config/input (found
    before any work), 5 the cache is locked by another writer, 6 failed during the run (finished work is kept;
    re-run continues), 143 stopped by SIGTERM.
    Example: distill pipeline --config examples/demo.yaml --set train.base.epochs=2
    """
    from distill.cluster.pipeline import PipelineConfig, partial_stages, run_pipeline
    from distill.teacher_cache.run import RunFailedError

    cfg = load_config(PipelineConfig, config_path, list(overrides), "pipeline")
    try:
        results = run_pipeline(cfg)
    except RunFailedError as exc:  # finished work is kept; re-running continues
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_RUN_FAILED) from None
    _print_comparison(results)
    _print_where(cfg)
    click.echo("\nstages:\n" + json.dumps(results, indent=1))
    if partial := partial_stages(results):
        click.echo(f"partial: stage(s) {', '.join(partial)} finished only part of their shards/variants (see "
                   "`failed` above and the leaderboard); fix them and re-run: exit 3", err=True)
        sys.exit(EXIT_PARTIAL)


def _print_comparison(results: list[dict]) -> None:
    """First thing at the end: each distilled student against its undistilled twin, then the winner."""
    from distill.student_train.leaderboard import format_twin_comparison

    train = next((r for r in results if r["stage"] == "train"), None)
    if train is None:
        return
    click.echo(format_twin_comparison(train.get("twins", [])))
    if train.get("best"):
        pair = next((p for p in train.get("twins", []) if p["variant"] == train["best"]), None)
        how = (f"distilled, {pair['delta_top1_vs_twin']:+.2f} pt over its twin {pair['twin']}"
               if pair and pair["delta_top1_vs_twin"] is not None else f"mode {train.get('best_mode')}")
        click.echo(f"winner: {train['best']} ({100 * train['best_val_top1']:.2f}% val top-1; {how})")
    if train.get("teacher_warning"):
        click.echo(train["teacher_warning"], err=True)


def _print_where(cfg: PipelineConfig) -> None:
    lines = ["", "artifacts:"]
    if cfg.shards:
        lines.append(f"  shards        {cfg.shards.out_dir}/  (train-*.tar, val-*.tar, classes.json)")
    if cfg.teacher:
        lines.append(f"  teacher       {cfg.teacher.run_dir}/  (<variant>/best.pt, leaderboard.txt)")
    if cfg.cache:
        lines.append(f"  teacher cache {cfg.cache.cache_root}/<fingerprint>/  (inspect: distill cache inspect "
                     f"{cfg.cache.cache_root})")
    if cfg.train:
        lines.append(f"  students      {cfg.train.run_dir}/  (leaderboard.txt, leaderboard.parquet, "
                     "<variant>/metrics.csv, best.pt)")
    if cfg.compress:
        lines.append(f"  compressed    {cfg.compress.out_dir}/  (report.txt, pareto.png, <student>/*.onnx)")
    if cfg.deploy:
        lines.append(f"  bundle        {cfg.deploy.out_dir}/  (model.onnx, model.int8.onnx, model_card.md)")
        lines += ["", "query the served model:",
                  f"  distill serve --bundle {cfg.deploy.out_dir} --port 8000 &",
                  "  curl -s -H 'Content-Type: image/png' --data-binary @digit.png http://127.0.0.1:8000/predict"]
    click.echo("\n".join(lines))

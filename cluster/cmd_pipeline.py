"""`distill pipeline`: the whole chain from one YAML, each stage skipping what is current."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cluster.cli_common import config_options
from cluster.config_loading import load_config


@click.command()
@config_options
def pipeline(config_path: Path | None, overrides: tuple[str, ...]) -> None:
    """Run shards -> teacher -> cache -> train -> compress -> deploy from one YAML (a section per stage).

    \b
    Re-running after a failure or a kill continues: shards are kept when current, finished variants are
    skipped, interrupted ones resume from their last epoch, the cache only labels new/changed shards.
    Example: distill pipeline --config examples/demo.yaml --set train.base.epochs=2
    """
    from cluster.pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, config_path, list(overrides), "pipeline")
    results = run_pipeline(cfg)
    click.echo(json.dumps(results, indent=1))
    _print_where(cfg)


def _print_where(cfg: object) -> None:
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

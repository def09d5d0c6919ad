"""`distill pipeline`: the whole chain from one YAML, each stage skipping what is current."""

from __future__ import annotations

import json
import shlex
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
@click.option("--json", "as_json", is_flag=True, help="Print every stage's summary as one JSON document instead of "
              "the short summary (the config's summary_json writes the same to a file).")
def pipeline(config_path: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Run shards -> teacher -> cache -> train -> compress -> deploy from one YAML (a section per stage).

    \b
    Re-running after a failure or a kill continues: shards are kept when current, finished variants are
    skipped, interrupted ones resume from their last epoch, the cache only labels new/changed shards.
    It ends on a short summary, after Ray has shut down: each distilled student against its undistilled twin
    (on the held-out test split when there is one), the winner (chosen on val), where the artefacts are, and
    how to query the served model with the sample image written into the bundle. The stage summaries as JSON:
    --json, or `summary_json: FILE` in the config.
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
    if as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        click.echo(summary_text(cfg, results))
    if partial := partial_stages(results):
        click.echo(f"partial: stage(s) {', '.join(partial)} finished only part of their shards/variants (see "
                   "`failed` in the stage summaries and the leaderboard); fix them and re-run: exit 3", err=True)
        sys.exit(EXIT_PARTIAL)


def summary_text(cfg: PipelineConfig, results: list[dict]) -> str:
    """The end of the screen: twin comparison, winner, artefacts, how to query the model (in that order)."""
    return "\n".join([*_comparison(results), *_where(cfg, results)])


def _comparison(results: list[dict]) -> list[str]:
    """Each distilled student against its undistilled twin, then the winner (chosen on val)."""
    from distill.student_train.leaderboard import format_twin_comparison

    train = next((r for r in results if r["stage"] == "train"), None)
    if train is None:
        return []
    lines = [format_twin_comparison(train.get("twins", []))]
    if train.get("best"):
        pair = next((p for p in train.get("twins", []) if p["variant"] == train["best"]), None)
        how = (f"distilled, {pair['delta_top1_vs_twin']:+.2f} pt over its twin {pair['twin']} on "
               f"{pair.get('compared_on', 'val')}" if pair and pair["delta_top1_vs_twin"] is not None
               else f"mode {train.get('best_mode')}")
        test = train.get("best_test_top1")
        test_text = f", {100 * test:.2f}% test top-1" if test is not None else ""
        lines.append(f"winner: {train['best']} ({100 * train['best_val_top1']:.2f}% val top-1, chosen on val"
                     f"{test_text}; {how})")
    if train.get("teacher_warning"):
        lines.append(train["teacher_warning"])
    return lines


def _where(cfg: PipelineConfig, results: list[dict]) -> list[str]:
    lines = ["", "artifacts:"]
    if cfg.shards:
        lines.append(f"  shards        {cfg.shards.out_dir}/  (train-*.tar, val-*.tar"
                     f"{', test-*.tar' if cfg.shards.test_fraction > 0 else ''}, classes.json)")
    if cfg.teacher:
        lines.append(f"  teacher       {cfg.teacher.run_dir}/  (<variant>/best.pt, leaderboard.txt)")
    if cfg.cache:
        lines.append(f"  teacher cache {cfg.cache.cache_root}/<fingerprint>/  (inspect: distill cache inspect "
                     f"{cfg.cache.cache_root})")
    if cfg.train:
        lines.append(f"  students      {cfg.train.run_dir}/  (leaderboard.txt, leaderboard.parquet, curves.png, "
                     "<variant>/metrics.csv, best.pt, test.json)")
    if cfg.compress:
        lines.append(f"  compressed    {cfg.compress.out_dir}/  (report.txt, pareto.png, <student>/*.onnx, *.tflite)")
    if cfg.summary_json:
        lines.append(f"  stage summaries {cfg.summary_json}")
    if store := _tracking_store(cfg):
        lines.append(f"  runs (MLflow)  {store}  (look: mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db)")
    deploy = next((r for r in results if r["stage"] == "deploy"), None)
    if cfg.deploy and deploy is not None:
        files = [f for f in deploy.get("files", []) if f != "bundle.json"]
        lines.append(f"  bundle        {cfg.deploy.out_dir}/  ({', '.join(files)})")
        lines += _query(str(cfg.deploy.out_dir), deploy)
    return lines


def _tracking_store(cfg: PipelineConfig) -> str | None:
    """The local MLflow store the students were recorded in (None: tracking off, or a server/URI of the user's)."""
    import os

    from distill.core.tracking import LOCAL_DIR

    train = cfg.train or cfg.teacher
    if train is None or not train.tracking.enabled or train.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return str(Path(train.run_dir).parent / LOCAL_DIR)


def _query(bundle: str, deploy: dict) -> list[str]:
    """How to query the served model; the curl sends the bundle's own sample image, so it works as printed (it
    retries while the server starts)."""
    sample = deploy.get("sample")
    if not sample:
        return ["", f"serve it:  distill serve --bundle {shlex.quote(bundle)} --port 8000"]
    what = f"a held-out image of class {deploy['sample_label']}" if deploy.get("sample_label") else "a held-out image"
    return ["", f"query the served model ({bundle}/{sample} is {what}):",
            f"  distill serve --bundle {shlex.quote(bundle)} --port 8000 &",
            f"  {curl_command(bundle + '/' + sample, deploy.get('sample_content_type') or 'image/png')}"]


def curl_command(image: str, content_type: str, url: str = "http://127.0.0.1:8000/predict") -> str:
    """A curl that waits for the server (retries for up to 3 minutes while it starts: Ray and Serve took over a
    minute on a loaded 2-core machine, and 30 retries ran out in a test) and prints the top-k JSON."""
    return (f"curl -s --retry 90 --retry-all-errors --retry-delay 2 --fail-with-body "
            f"-H 'Content-Type: {content_type}' --data-binary {shlex.quote('@' + image)} {url}")

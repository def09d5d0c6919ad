"""`distill train`: many student variants from the teacher cache (or plain supervised with mode: none)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distill.cluster.cli_common import STATUS_EXIT, config_options, ray_overrides
from distill.cluster.config_loading import load_config
from distill.core.metrics_server import start_metrics_server


@click.command()
@config_options
@click.option("--no-ray", is_flag=True, help="Train the groups one after another in this process (1 worker each).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster).")
@click.option("--variant", "only", default=None, help="Train only this variant, alone (a group of one).")
def train(config_path: Path | None, overrides: tuple[str, ...], no_ray: bool, address: str | None,
          only: str | None) -> None:
    """Train student variants with DeepSpeed (Ray Tune runs them in parallel) and print a leaderboard.

    \b
    Modes: soft (KD from cached top-k at the variant's T), hard (teacher argmax), none (plain CE: teacher
    pre-training and the no-KD baseline), online (teacher runs live: the baseline the cache must beat).
    Feature KD: beta > 0 (+ feature_loss cosine|mse) on a cache written with features.enabled: true.
    Variants: `variants:` (explicit list) and/or `grid:` (cartesian product over variant fields) over `base:`.
    Students: arch (registered, timm:<name>, torchvision:<name>) + arch_kwargs, input_size, mean/std, channels
    (default the cache's; 3 on a grey cache replicates its grey pixels: RGB-only torchvision models and RGB
    weights), init_checkpoint (start from a local state dict, e.g. ImageNet weights of the same architecture:
    weights_only=True, head replaced for another class count, stem adapted for other channels). Every student is
    built and run on one input before any work: what does not fit is listed with the fix, exit 2, nothing done.
    Twins: every distilled recipe gets an undistilled twin (same recipe, mode none, named <arch>-noKD) unless
    `twins: false`; the leaderboard shows Δ top-1 against it, on data.test_shards when set (held out: each
    best.pt, chosen on val, is scored on it once after training; <variant>/test.json), else on val.
    `data.unlabelled_shards`: a cached pool whose rows teach distilled variants through the KD term only; beside
    it a mode-none variant makes several passes over the labelled shards per epoch, so a twin takes the same
    optimizer steps (`data.labelled_passes`).
    Groups: variants that share a data stream (shards + pool as their mode reads them, passes, views, batch,
    epochs, data seed, input preprocessing, ranks) train in one group: one loader, each batch read once for all;
    every student keeps its own optimizer, schedule, loss, checkpoints and files. The plan is printed first
    (<run_dir>/plan.txt); `fuse: auto|off|N` (N = at most N per group), `horizontal: auto|on|off` (students of
    one architecture as one fused model; auto = on CUDA). A Ray Tune trial is a group.
    Output: <run_dir>/<variant>/{metrics.csv, best.pt, arch.json, ds_ckpt/, status.json}, leaderboard.parquet.
    Re-running skips finished variants and resumes interrupted ones from their last epoch checkpoint.
    Without Ray, on N processes: torchrun --nproc_per_node N $(which distill) train -c X [--variant NAME]
    A student that fails during the run (non-finite loss, a step that raises) fails alone: its leaderboard row
    says why, the others go on, and compress/deploy take them.
    Exit: 0 all variants done, 3 some failed, 4 all failed, 2 bad config/input (found before training began),
    6 failed during the run (finished epochs are kept; re-run resumes), 143 stopped by SIGTERM (`ray job stop`:
    unfinished variants are marked interrupted and resume on the next run).
    The output ends with the cached teacher's val top-1 and a warning when it is below its best student.
    Example: distill train --config examples/demo.yaml --set base.epochs=2
    """
    from distill.student_train.config import TrainConfig
    from distill.student_train.leaderboard import (
        format_leaderboard,
        format_teacher_line,
        format_twin_comparison,
        twin_pairs,
    )
    from distill.student_train.run import run

    sets = list(overrides) + ray_overrides(no_ray, address)
    cfg = load_config(TrainConfig, config_path, sets, "train")
    if not cfg.ray.enabled and cfg.metrics_port is not None:
        start_metrics_server("127.0.0.1", cfg.metrics_port)
    result = run(cfg, only)
    if not result.leaderboard:  # a non-zero rank under torchrun: rank 0 reports
        return
    click.echo(format_twin_comparison(twin_pairs(result.leaderboard)) + "\n")
    click.echo(format_leaderboard(result.leaderboard))
    click.echo("\n" + format_teacher_line(result.teacher_val_top1, result.teacher_test_top1))
    if result.teacher_warning:
        click.echo(result.teacher_warning, err=True)
    click.echo(f"\nleaderboard: {result.leaderboard_path}\nrun dir:     {result.run_dir}")
    sys.exit(STATUS_EXIT[result.status])

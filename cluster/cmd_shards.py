"""`distill shards`: image folder or bundled real data set -> WebDataset train/val shards."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from distill.cluster.config_loading import load_config

SHOWN = 20  # skipped files printed in the summary; the rest are in <out_dir>/skipped.jsonl


@click.command()
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML config (fields below at top level, or under `shards:`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one field (repeatable).")
@click.option("--source", default=None, help="'mnist', 'digits' or an image-folder directory (one folder per class).")
@click.option("--out-dir", default=None, help="Where to write train-*.tar, val-*.tar, test-*.tar and classes.json.")
def shards(config_path: Path | None, overrides: tuple[str, ...], source: str | None, out_dir: str | None) -> None:
    """Write ImageNet-WDS shards (<key>.png|jpg|webp + .cls + .json) with a train/val(/test) split.

    \b
    Every image is decoded once while it is written: empty, undecodable and oversized files are skipped,
    listed in the summary and in <out_dir>/skipped.jsonl, and not counted in `samples`.

    \b
    Val selects (best epoch, best student, compress stages); test (test_fraction > 0) is held out: nothing
    selects on it, `distill train` reports each student's best.pt on it and compares twins there.

    \b
    Fields: source, out_dir, samples_per_shard (500), val_fraction (0.1), test_fraction (0), image_format
            (png|jpg|webp), limit (all), seed (0).
    Example: distill shards --source mnist --out-dir runs/demo/shards --set samples_per_shard=500
    """
    from distill.images.shard_writer import ShardsConfig, run

    extra = [f"source={source}"] if source else []
    extra += [f"out_dir={out_dir}"] if out_dir else []
    cfg = load_config(ShardsConfig, config_path, list(overrides) + extra, "shards")
    result = run(cfg)
    (Path(cfg.out_dir) / "shards_config.resolved.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    click.echo(json.dumps({"train": result.train_pattern, "val": result.val_pattern, "test": result.test_pattern,
                           "classes": len(result.classes), "samples": result.samples,
                           "train_shards": len(result.train), "val_shards": len(result.val),
                           "test_shards": len(result.test), "skipped": len(result.skipped),
                           "skipped_files": [{"file": f, "reason": r} for f, r in result.skipped[:SHOWN]]},
                          indent=1))
    if len(result.skipped) > SHOWN:
        click.echo(f"{len(result.skipped)} files skipped; all listed in {Path(cfg.out_dir) / 'skipped.jsonl'}",
                   err=True)

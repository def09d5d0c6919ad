"""Feature-alignment benchmark on the demo data: logit KD vs logit + feature KD, mean over seeds.

    .venv/bin/python bench/feature_kd.py [--epochs 3] [--seeds 0 1 2] [--teacher-epochs 4] [--train-shards 4]
                                         [--configs logit cosine mse] [--dim D]

Builds what is missing under runs/demo/ (shards, the demo teacher with --teacher-epochs, in-process, no Ray),
then a cache WITH teacher features (schema v2) under runs/demo/cache_features, then trains the same student
(cnn_small width 8, mode soft, alpha 0.9, T 4, the demo's recipe) with beta 0 (logit KD only) and beta > 0
(cosine / mse feature loss through a learned projector), same epochs, views and seeds, in-process DeepSpeed.
Writes bench/out/feature_kd/results.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import pandas as pd

from distill.cluster.config_loading import load_config
from distill.cluster.pipeline import PipelineConfig, run_pipeline
from distill.student_train.config import TrainConfig
from distill.student_train.run import run as run_train
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.inspect_cache import inspect_cache
from distill.teacher_cache.run import run as run_cache

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"arch": "cnn_small", "arch_kwargs": {"width": 8}, "mode": "soft", "alpha": 0.9, "temperature": 4.0}
ALL_CONFIGS = {"logit": ("logit KD (beta 0)", {"beta": 0.0}),
               "cosine": ("+ feature KD, cosine, beta 1", {"beta": 1.0, "feature_loss": "cosine"}),
               "mse": ("+ feature KD, mse, beta 1", {"beta": 1.0, "feature_loss": "mse"})}
CONFIGS: dict[str, dict] = {}


def demo_config(teacher_epochs: int) -> PipelineConfig:
    os.chdir(ROOT)
    cfg = load_config(PipelineConfig, ROOT / "examples" / "demo.yaml", [], "pipeline")
    t = cfg.teacher
    teacher = t.model_copy(update={"ray": t.ray.model_copy(update={"enabled": False}), "metrics_port": None,
                                   "base": t.base.model_copy(update={"epochs": teacher_epochs})})
    return cfg.model_copy(update={"teacher": teacher})


def ensure_teacher(cfg: PipelineConfig) -> None:
    if not Path(cfg.cache.teacher.checkpoint).exists():
        run_pipeline(PipelineConfig(shards=cfg.shards, teacher=cfg.teacher, metrics={"enabled": False}))


def train_shard_paths(n: int) -> list[str]:
    return sorted(str(p) for p in Path("runs/demo/shards").glob("train-*.tar"))[:n]


def feature_cache(cfg: PipelineConfig, dim: int | None, train_shards: int) -> Path:
    c = cfg.cache.model_dump(mode="json")
    c.update(shards=[*train_shard_paths(train_shards), "runs/demo/shards/val-*.tar"],
             cache_root="runs/demo/cache_features", features={"enabled": True, "dim": dim, "seed": 0},
             ray={"enabled": False}, metrics={"enabled": False}, progress=False)
    res = run_cache(CacheConfig.model_validate(c))
    if res.status != "success":
        raise RuntimeError(f"feature cache failed: {res.failed}")
    return res.cache_dir


def train_all(cfg: PipelineConfig, cache_dir: Path, out: Path, epochs: int, seeds: list[int],
              train_shards: int) -> pd.DataFrame:
    base = cfg.train.model_dump(mode="json")
    shards = train_shard_paths(train_shards)
    variants = [{"name": f"c{i}-s{seed}", "seed": seed, **STUDENT, **extra}
                for seed in seeds for i, extra in enumerate(CONFIGS.values())]
    base.update(run_dir=str(out), variants=variants, grid={}, ray={"enabled": False}, metrics_port=None,
                base={**base["base"], "epochs": epochs, "num_workers": 1},
                data={**base["data"], "cache_root": str(cache_dir.parent), "fingerprint": cache_dir.name,
                      "train_shards": shards})
    run_train(TrainConfig.model_validate(base))
    rows = []
    labels = list(CONFIGS)
    for v in variants:
        m = pd.read_csv(out / v["name"] / "metrics.csv")
        rows.append({"config": labels[int(v["name"][1:v["name"].index("-")])], "seed": v["seed"],
                     "val_top1": m["val_top1"].iloc[-1], "best_val_top1": m["val_top1"].max(),
                     "feat_loss_last": m["feat_loss"].iloc[-1], "epoch_seconds": m["epoch_seconds"].mean()})
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> str:
    lines = ["| student (cnn_small w8, soft, alpha 0.9, T 4) | val top-1, last epoch (mean ± std) | best epoch "
             "| Δ vs logit KD | s/epoch |", "|---|---|---|---|---|"]
    ref = df[df.config == next(iter(CONFIGS))].val_top1.mean()
    for name in CONFIGS:
        d = df[df.config == name]
        acc = d.val_top1.tolist()
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {name} | {100 * statistics.mean(acc):.2f} ± {100 * std:.2f} | "
                     f"{100 * d.best_val_top1.mean():.2f} | {100 * (d.val_top1.mean() - ref):+.2f} pt | "
                     f"{d.epoch_seconds.mean():.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-shards", type=int, default=4, help="first N demo train shards (500 samples each)")
    ap.add_argument("--configs", nargs="+", default=["logit", "cosine"], choices=sorted(ALL_CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--dim", type=int, default=None, help="feature projection dim (default: the full embedding)")
    args = ap.parse_args()
    CONFIGS.update(dict(ALL_CONFIGS[c] for c in args.configs))
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    cfg = demo_config(args.teacher_epochs)
    ensure_teacher(cfg)
    cache_dir = feature_cache(cfg, args.dim, args.train_shards)
    info = inspect_cache(cache_dir)
    out = ROOT / "bench" / "out" / "feature_kd"
    df = train_all(cfg, cache_dir, out / "runs", args.epochs, args.seeds, args.train_shards)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": vars(args),
              "teacher_top1_vs_labels": info["teacher_top1_vs_labels"], "features": info["features"],
              "bytes_per_sample_view": info["bytes_per_sample_view"],
              "bytes_per_sample_view_without_features": info["bytes_per_sample_view_without_features"],
              "rows": df.to_dict("records"), "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(table(df))
    print(f"\ncache: {info['bytes_per_sample_view']:.1f} bytes per sample-view with features "
          f"({info['features']['dim']} x fp16), {info['bytes_per_sample_view_without_features']:.1f} without; "
          f"teacher top-1 (view 0, train+val rows) {info['teacher_top1_vs_labels']:.4f}; "
          f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()

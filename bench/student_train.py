"""Student-training benchmark on the demo data: does distillation pay, at equal epochs, over several seeds?

    .venv/bin/python bench/student_train.py [--epochs 6] [--seeds 0 1 2] [--grid 0.5:2 0.9:4 0.5:2:1:cosine]
        [--online 0.5:2] [--skip-online] [--skip-unlabelled] [--skip-equal-epochs] [--views N]
        [--arch cnn_small --width 16 | --arch mlp --arch-kwargs '{"hidden": 256}']
        [--config examples/demo.yaml] [--work runs/bench_train] [--out bench/out/student_train.json]
    .venv/bin/python bench/student_train.py --merge A.json B.json ... --out ALL.json   # runs split by seed

Needs the demo's shards, teacher and cache (built here from examples/demo.yaml when missing). In-process
DeepSpeed (1 rank, fp32), every run one after another in one process, so Ray scheduling is not measured.
(a) labels on every train shard (the config's pool included): the same student, epochs, optimizer, schedule,
    views and seed under mode none (the twin), cached soft KD at
    each (alpha, T) of the grid, and online KD (teacher live on the very crops the cache replays);
(b) labels on one train shard only (10% of the demo's train set) against the same labels plus the teacher's
    soft labels on the other shards (`data.unlabelled_shards`); the labels-only twin at equal optimizer steps
    (the training default: ~10 passes over its shard per epoch) is the baseline, and the same twin at equal
    epochs (`data.labelled_passes: 1`, 1/10 of the steps) is shown for scale.
A grid entry alpha:T:beta:loss adds feature KD (beta, cosine|mse) to the soft term; it needs a cache written with
cache.features.enabled (in --config). Per-run rows go to bench/out/student_train.json; the summary is printed as YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import pandas as pd
import torch
import yaml

from distill.cluster.config_loading import load_config
from distill.cluster.pipeline import PipelineConfig, run_pipeline
from distill.images.shards import expand_shard_patterns
from distill.student_train.config import TrainConfig
from distill.student_train.run import run as run_train

ROOT = Path(__file__).resolve().parents[1]


def ensure_demo_inputs(config: Path) -> PipelineConfig:
    os.chdir(ROOT)
    cfg = load_config(PipelineConfig, config, [], "pipeline")
    if not Path(cfg.cache.cache_root).exists() or not Path(cfg.cache.teacher.checkpoint).exists():
        run_pipeline(cfg.model_copy(update={"train": None, "compress": None, "deploy": None}))
    return cfg


def train_shards(cfg: PipelineConfig) -> list[str]:
    """Every train shard of the config, labelled or in its unlabelled pool (the demo labels 10% of them)."""
    return [str(p) for p in expand_shard_patterns(cfg.train.data.train_shards + cfg.train.data.unlabelled_shards)]


def _train(cfg: PipelineConfig, out: Path, variants: list[dict], epochs: int, data: dict | None = None) -> None:
    base = cfg.train.model_dump(mode="json")
    base.update(run_dir=str(out), variants=variants, grid={}, twins=False, ray={"enabled": False},
                metrics_port=None, base={**base["base"], "epochs": epochs, "num_workers": 1})
    base["data"].update(data or {})
    run_train(TrainConfig.model_validate(base))


def _result(out: Path, v: dict) -> dict:
    m = pd.read_csv(out / v["name"] / "metrics.csv")
    return {"name": v["name"], "mode": v["mode"], "seed": v["seed"], "alpha": v.get("alpha"),
            "temperature": v.get("temperature"), "epochs": len(m), "val_top1": float(m["val_top1"].iloc[-1]),
            "best_val_top1": float(m["val_top1"].max()), "samples_per_s": float(m["samples_per_s"].mean()),
            "epoch_seconds": float(m["epoch_seconds"].mean())}


def _summary(df: pd.DataFrame, key: str, baseline: str) -> dict:
    """Mean ± std of the final val top-1 per configuration, and of the paired (same seed) gain over baseline."""
    out = {}
    base = df[df[key] == baseline].set_index("seed")["val_top1"]
    for name, g in df.groupby(key, sort=False):
        gain = [float(100 * (r.val_top1 - base[r.seed])) for r in g.itertuples() if r.seed in base.index]
        out[name] = {"val_top1_mean": round(float(100 * g["val_top1"].mean()), 2),
                     "val_top1_std": round(float(100 * g["val_top1"].std(ddof=1)), 2) if len(g) > 1 else None,
                     "gain_pt_mean": round(statistics.mean(gain), 2) if gain else None,
                     "gain_pt_std": round(statistics.stdev(gain), 2) if len(gain) > 1 else None,
                     "seeds": int(len(g)), "samples_per_s": round(float(g["samples_per_s"].mean()), 1)}
    return out


def equal_epochs(cfg: PipelineConfig, out: Path, student: dict, epochs: int, seeds: list[int],
                 grid: list[tuple], online: tuple[float, float] | None,
                 twin: bool = True) -> pd.DataFrame:
    variants = []
    for seed in seeds:
        if twin:
            variants.append({"name": f"none-s{seed}", "mode": "none", "seed": seed, **student})
        for a, t, *feat in grid:
            fk = {"beta": feat[0], "feature_loss": feat[1]} if feat else {}
            tag = f"-b{feat[0]:g}{feat[1]}" if feat else ""
            variants.append({"name": f"soft-a{a}-T{t:g}{tag}-s{seed}", "mode": "soft", "alpha": a,
                             "temperature": t, "seed": seed, **fk, **student})
        if online:
            variants.append({"name": f"online-a{online[0]}-T{online[1]:g}-s{seed}", "mode": "online",
                             "alpha": online[0], "temperature": online[1], "seed": seed, **student})
    _train(cfg, out, variants, epochs, {"train_shards": train_shards(cfg), "unlabelled_shards": []})  # all labels
    rows = [_result(out, v) for v in variants]
    for r in rows:
        r["config"] = r["name"].rsplit("-s", 1)[0]
    return pd.DataFrame(rows)


def unlabelled(cfg: PipelineConfig, out: Path, student: dict, epochs: int, seeds: list[int],
               kd: tuple[float, float]) -> tuple[pd.DataFrame, dict]:
    shards = train_shards(cfg)
    labelled, pool = shards[:1], shards[1:]
    share = {"labelled_shards": len(labelled), "pool_shards": len(pool)}
    few, same = [], []  # the twin at equal epochs (1 pass per epoch); the twin at equal steps and KD
    for seed in seeds:
        few.append({"name": f"labels-only-eqepochs-s{seed}", "mode": "none", "seed": seed, **student})
        same += [{"name": f"labels-only-s{seed}", "mode": "none", "seed": seed, **student},
                 {"name": f"labels+pool-soft-s{seed}", "mode": "soft", "alpha": kd[0], "temperature": kd[1],
                  "seed": seed, **student}]
    data = {"train_shards": labelled, "unlabelled_shards": pool}
    _train(cfg, out / "eqepochs", few, epochs, {**data, "labelled_passes": 1})
    _train(cfg, out / "eqsteps", same, epochs, data)
    rows = [_result(out / "eqepochs", v) for v in few] + [_result(out / "eqsteps", v) for v in same]
    for r in rows:
        r["config"] = r["name"].rsplit("-s", 1)[0]
    return pd.DataFrame(rows), share


def merge(paths: list[Path], out: Path) -> None:
    """One summary over several result files (runs split over processes by seed or by part)."""
    first = json.loads(paths[0].read_text())
    rows = [r for p in paths for r in json.loads(p.read_text())["per_run"]]
    df = pd.DataFrame(rows)
    result = {k: first[k] for k in ("machine", "student", "teacher", "recipe") if k in first}
    result["merged_from"] = [str(p) for p in paths]
    for part, baseline in (("equal_epochs", "none"), ("unlabelled", "labels-only")):
        sub = df[df["part"] == part] if "part" in df else df.iloc[0:0]
        if len(sub):
            result[part] = _summary(sub, "config", baseline)
    result["per_run"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(yaml.safe_dump({k: v for k, v in result.items() if k != "per_run"}, sort_keys=False))


def _pair(s: str) -> tuple[float, float]:
    a, t = s.split(":")
    return float(a), float(t)


def _kd(s: str) -> tuple:
    """alpha:T, or alpha:T:beta:loss for logit + feature KD (needs a cache with teacher features)."""
    if s.count(":") == 1:
        return _pair(s)
    a, t, beta, loss = s.split(":")
    return float(a), float(t), float(beta), loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grid", type=_kd, nargs="*", default=[(0.5, 2.0), (0.9, 4.0)],
                    help="alpha:T pairs, or alpha:T:beta:loss (cosine|mse) for logit + feature KD, which needs a "
                    "cache with teacher features (cache.features.enabled in --config)")
    ap.add_argument("--no-twin", action="store_true", help="skip the mode-none runs (when another process runs "
                    "them; --merge pairs them up by seed)")
    ap.add_argument("--online", type=_pair, default=(0.5, 2.0), help="alpha:T of the online-KD runs")
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--skip-unlabelled", action="store_true")
    ap.add_argument("--skip-equal-epochs", action="store_true")
    ap.add_argument("--arch", default="cnn_small")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--arch-kwargs", type=json.loads, help='the student\'s arch_kwargs as JSON, instead of --width '
                    '(e.g. --arch mlp --arch-kwargs \'{"hidden": 256}\')')
    ap.add_argument("--lr", type=float, help="peak learning rate of every run (default: the config's train.base.lr)")
    ap.add_argument("--views", type=int, help="cached views each run cycles through (default: all; 1 = view 0 only, "
                    "the whole digit: no augmentation for either student)")
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "demo.yaml",
                    help="a pipeline YAML whose cache/train sections name the shards, cache and recipe")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train", help="run directories (wiped)")
    ap.add_argument("--merge", type=Path, nargs="+", help="summarise the per-run rows of earlier result files "
                    "(e.g. one process per seed) instead of training")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "student_train.json")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    cfg = ensure_demo_inputs(args.config)
    student = {"arch": args.arch, "arch_kwargs": args.arch_kwargs or {"width": args.width},
               **({"lr": args.lr} if args.lr else {}), **({"views": args.views} if args.views else {})}
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 when the machine is shared
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                    "student": student, "teacher": cfg.cache.teacher.model_dump(mode="json"),
                    "recipe": {k: v for k, v in cfg.train.base.model_dump(mode="json").items()
                               if k in ("batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs", "views")},
                    "epochs": args.epochs, "seeds": args.seeds, "per_run": []}
    if args.lr:
        result["recipe"]["lr"] = args.lr
    if not args.skip_equal_epochs:
        df = equal_epochs(cfg, work / "modes", student, args.epochs, args.seeds, args.grid,
                          None if args.skip_online else args.online, not args.no_twin)
        result["equal_epochs"] = _summary(df, "config", "none")
        result["per_run"] += [{**r, "part": "equal_epochs"} for r in df.to_dict("records")]
    if not args.skip_unlabelled:
        df, share = unlabelled(cfg, work / "unlabelled", student, args.epochs, args.seeds, args.grid[0])
        result["unlabelled"] = {"split": share, **_summary(df, "config", "labels-only")}
        result["per_run"] += [{**r, "part": "unlabelled"} for r in df.to_dict("records")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(yaml.safe_dump({k: v for k, v in result.items() if k != "per_run"}, sort_keys=False))


if __name__ == "__main__":
    main()

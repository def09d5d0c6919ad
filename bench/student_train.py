"""Student-training benchmark on the demo data: accuracy and cost of no-KD vs cached KD vs online KD.

    .venv/bin/python bench/student_train.py [--epochs 4] [--seeds 0 1 2] [--skip-concurrency]

Needs the demo's shards, teacher and cache (built here from examples/demo.yaml when missing).
(1) val top-1 of the same student, epochs, views and seeds under mode none / soft (cache) / online;
(2) cached-KD samples/s over plain-CE samples/s; (3) online vs offline wall time per epoch against the limit
1 + t_teacher / t_student measured on the same batches; (4) two variants at once vs one at a time (Ray Tune).
All in one run on one machine; in-process DeepSpeed (1 rank) for (1)-(3) so Ray scheduling is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import pandas as pd
import torch
import yaml

from cluster.config_loading import load_config
from cluster.pipeline import PipelineConfig, run_pipeline
from student_train.config import TrainConfig
from student_train.run import run as run_train
from teacher_cache.models import create_model
from teacher_cache.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"arch": "cnn_small", "arch_kwargs": {"width": 8}}


def ensure_demo_inputs() -> PipelineConfig:
    os.chdir(ROOT)
    cfg = load_config(PipelineConfig, ROOT / "examples" / "demo.yaml", [], "pipeline")
    if not (Path(cfg.cache.cache_root)).exists() or not Path(cfg.cache.teacher.checkpoint).exists():
        run_pipeline(cfg.model_copy(update={"train": None}))
    return cfg


def train_runs(cfg: PipelineConfig, out: Path, epochs: int, seeds: list[int]) -> pd.DataFrame:
    base = cfg.train.model_dump(mode="json")
    variants = [{"name": f"{mode}-s{seed}", "mode": mode, "seed": seed, **STUDENT}
                for seed in seeds for mode in ("none", "soft", "online")]
    base.update(run_dir=str(out), variants=variants, grid={}, ray={"enabled": False}, metrics_port=None,
                base={**base["base"], "epochs": epochs, "alpha": 0.9, "temperature": 4.0, "num_workers": 1})
    run_train(TrainConfig.model_validate(base))
    rows = []
    for v in variants:
        m = pd.read_csv(out / v["name"] / "metrics.csv")
        rows.append({"mode": v["mode"], "seed": v["seed"], "val_top1": m["val_top1"].iloc[-1],
                     "samples_per_s": m["samples_per_s"].mean(), "epoch_seconds": m["epoch_seconds"].mean()})
    return pd.DataFrame(rows)


def forward_costs(cfg: PipelineConfig, batch: int = 64, reps: int = 30) -> dict[str, float]:
    """t_teacher (inference) and t_student (forward + backward + step) per batch on the same input size."""
    teacher = load_teacher(cfg.cache.teacher)
    size, ch = teacher.preprocessing.input_size, teacher.preprocessing.channels
    student = create_model(STUDENT["arch"], 10, ch, **STUDENT["arch_kwargs"])
    opt = torch.optim.AdamW(student.parameters())
    x = torch.randn(batch, ch, size, size)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def step() -> None:
        opt.zero_grad()
        student(x).logsumexp(1).mean().backward()
        opt.step()

    with torch.inference_mode():
        t_teacher = timed(lambda: teacher.model(x))
    return {"t_teacher": t_teacher, "t_student": timed(step)}


def concurrency(cfg: PipelineConfig, out: Path) -> dict[str, float]:
    base = cfg.train.model_dump(mode="json")
    res = {}
    for conc in (1, 2):
        d = out / f"conc{conc}"
        variants = [{"name": f"v{i}", **STUDENT} for i in range(2)]
        base.update(run_dir=str(d), variants=variants, grid={}, ray={"enabled": True}, metrics_port=None,
                    tune={"max_concurrent": conc, "cpus_per_trial": 0.05},
                    base={**base["base"], "epochs": 2, "num_workers": 1, "cpus_per_worker": 0.45})
        run_train(TrainConfig.model_validate(base))
        res[f"samples_per_s_concurrency{conc}"] = statistics.mean(
            pd.read_csv(d / v["name"] / "metrics.csv")["samples_per_s"].mean() for v in variants)
    res["per_variant_ratio"] = res["samples_per_s_concurrency2"] / res["samples_per_s_concurrency1"]
    res["aggregate_ratio"] = 2 * res["per_variant_ratio"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "student_train.json")
    args = ap.parse_args()
    cfg = ensure_demo_inputs()
    work = ROOT / "runs" / "bench_train"
    shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(2)
    df = train_runs(cfg, work / "modes", args.epochs, args.seeds)
    acc = df.groupby("mode")["val_top1"].agg(["mean", "std"]).to_dict("index")
    speed = df.groupby("mode")[["samples_per_s", "epoch_seconds"]].mean().to_dict("index")
    costs = forward_costs(cfg)
    limit = 1 + costs["t_teacher"] / costs["t_student"]
    observed = speed["online"]["epoch_seconds"] / speed["soft"]["epoch_seconds"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "student": STUDENT, "teacher": cfg.cache.teacher.model_dump(mode="json"), "epochs": args.epochs,
        "seeds": args.seeds, "per_run": df.to_dict("records"), "val_top1": acc,
        "cached_minus_online_pt": 100 * (acc["soft"]["mean"] - acc["online"]["mean"]),
        "cached_minus_noKD_pt": 100 * (acc["soft"]["mean"] - acc["none"]["mean"]),
        "throughput_cached_over_plain": speed["soft"]["samples_per_s"] / speed["none"]["samples_per_s"],
        "online_over_offline_epoch_time": observed, "limit_1_plus_tteacher_over_tstudent": limit,
        "fraction_of_limit": observed / limit, **costs,
    }
    if not args.skip_concurrency:
        result["concurrency"] = concurrency(cfg, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(yaml.safe_dump({k: v for k, v in result.items() if k != "per_run"}, sort_keys=False))


if __name__ == "__main__":
    main()

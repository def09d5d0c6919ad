"""Fused sweep (issue 22): K students trained from one data stream, against one trial per student, same cores.

    PYTHONPATH=. python -m bench.sweep [--k 4 8] [--workloads digits photos] [--work runs/bench_sweep]
        [--out bench/out/sweep.json]

Workloads (teachers with random weights: speed does not depend on them):
- digits: the demo's data and cache shape (5,000 MNIST digits, shards of 450, 6 views, top-5, 28 px), students
  cnn_small width 8;
- photos: 224-px JPEG shards (500x375 JPEGs cut from scikit-learn's two sample photos, as the data-path benches
  make them: bench.gpu_check.make_shards), a 1-view top-10 cache over 1,000 classes at 224 px; light students
  (mlp, hidden 16, on the 224-px input).
Students: K variants of one architecture, an alpha x temperature x lr sweep (one data stream).

Per workload (after one discarded warm-up run: imports, first engine, cache checks) and K, all in this process, on
the same cores, in `--repeats` rounds whose order alternates (group, loader+steps, today; then today, loader+steps,
group; ...), each measurement with the machine's 1-minute load average before and after it:
- group:   `distill train --no-ray` with train.fuse auto (one loader, K students): the epoch's wall time
           (metrics.csv epoch_seconds) and the whole run's;
- loader:  the group's loader alone over the same epoch (decode + view replay + cache join, no model);
- steps:   each student alone stepping over that epoch's batches preloaded in memory (its own engine), summed;
- today:   train.fuse off: one loader per student, one student after another (what one trial per variant costs
           on the same cores): the sum of their epoch walls, and the whole run's wall;
- fused:   train.horizontal on (the K students as one model), epoch wall, for the record on this CPU;
- layouts: per-step time of K engines (one per student, what training uses) against one DeepSpeed engine over a
           ModuleList of the K students with one parameter group each (no clipping: DeepSpeed's is global).
- fused and layouts (below) run once, after the rounds.
Ratios: efficiency = group epoch / (loader + sum of steps) (goal <= 1.15); speed-up = today / group (goal >= 3
for K = 8 on the photos), per round, reported as median [min-max]. The bound: with a loader cost L and a student
step cost S per batch (measured: loader alone / batches, mean student step), one loader for K students can at most
gain K(L+S)/(L+KS) over K loaders: near K when the loader dominates (L >> KS), near 1 when the students do. A
loaded machine that slows the steps more than the loader moves a run toward 1: the bound printed beside each
speed-up says which regime that run was in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {"digits": {"arch": "cnn_small", "arch_kwargs": {"width": 8}},
            "photos": {"arch": "mlp", "arch_kwargs": {"hidden": 16, "depth": 1, "input_size": 224}}}


def digits_data(work: Path, limit: int | None = None) -> dict:
    from distill.core.models import create_model
    from distill.images.shard_writer import ShardsConfig
    from distill.images.shard_writer import run as write_shards
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run as cache_run

    shards = work / "digits" / (f"shards-{limit}" if limit else "shards")
    if not (shards / "train-000000.tar").exists():
        write_shards(ShardsConfig.model_validate({"source": "mnist", "out_dir": str(shards), "samples_per_shard": 450,
                                                  "val_fraction": 0.1, "image_format": "png", "limit": limit}))
    ckpt = work / "digits" / "teacher.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(create_model("resnet_mini", num_classes=10, in_chans=1, width=16).state_dict(), ckpt)
    prep = {"input_size": 28, "crop_pct": 1.0, "mean": [0.1307], "std": [0.3081], "channels": 1}
    teacher = {"arch": "resnet_mini", "arch_kwargs": {"width": 16}, "checkpoint": str(ckpt), "preprocessing": prep}
    cache = work / "digits" / (f"cache-{limit}" if limit else "cache")
    res = cache_run(CacheConfig.model_validate({
        "shards": [str(shards / "train-*.tar")], "cache_root": str(cache), "teacher": teacher, "topk": 5,
        "views": {"num_views": 6, "scale": [0.7, 1.0], "ratio": [0.85, 1.18], "flip": False}, "batch_size": 128,
        "ray": {"enabled": False}, "metrics": {"enabled": False}, "progress": False}))
    assert res.status == "success", res.failed
    return {"train": [str(shards / "train-*.tar")], "cache_root": str(cache), "teacher": teacher, "batch": 64}


def photos_data(work: Path, images: int) -> dict:
    from bench.gpu_check import make_shards
    from distill.core.models import create_model
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run as cache_run

    shards = make_shards(work / "photos" / "shards", images, 4)
    ckpt = work / "photos" / "teacher.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(create_model("cnn_small", num_classes=1000, in_chans=3, width=4).state_dict(), ckpt)
    teacher = {"arch": "cnn_small", "arch_kwargs": {"width": 4}, "checkpoint": str(ckpt),
               "preprocessing": {"input_size": 224}}
    res = cache_run(CacheConfig.model_validate({
        "shards": [str(s) for s in shards], "cache_root": str(work / "photos" / "cache"), "teacher": teacher,
        "topk": 10, "views": {"num_views": 1}, "batch_size": 32, "ray": {"enabled": False},
        "metrics": {"enabled": False}, "progress": False}))
    assert res.status == "success", res.failed
    return {"train": [str(s) for s in shards], "cache_root": str(work / "photos" / "cache"), "teacher": teacher,
            "batch": 32}


def sweep(k: int) -> list[dict]:
    grid = [(a, t, lr) for lr in (2e-3, 4e-3) for a in (0.5, 0.9) for t in (2.0, 4.0)]
    return [{"name": f"s{i}-a{a}-T{t}-lr{lr}", "alpha": a, "temperature": t, "lr": lr}
            for i, (a, t, lr) in enumerate(grid[:k])]


def train_config(data: dict, workload: str, run_dir: Path, k: int, **over: object):
    from distill.student_train.config import TrainConfig

    return TrainConfig.model_validate({
        "run_dir": str(run_dir), "teacher": data["teacher"], "ray": {"enabled": False}, "metrics_port": None,
        "log_every": 1000, "twins": False, "keep_checkpoints": 1,
        "data": {"train_shards": data["train"], "cache_root": data["cache_root"], "loader_workers": 1},
        "base": {**STUDENTS[workload], "epochs": 1, "batch_size": data["batch"], "mode": "soft"},
        "variants": sweep(k), **over})


def timed_run(cfg) -> dict:
    from distill.student_train.run import run

    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    assert res.status == "success", res.leaderboard
    epochs = [float(pd.read_csv(Path(cfg.run_dir) / r["variant"] / "metrics.csv")["epoch_seconds"].iloc[0])
              for r in res.leaderboard]
    return {"wall_s": wall, "epoch_s": epochs}


def loader_and_steps(cfg) -> dict:
    """The group's epoch from its loader alone; then each student alone over those batches, preloaded."""
    from distill.student_train.checkpoints import Storage
    from distill.student_train.job_plan import plan_job
    from distill.student_train.student import StepInputs, StudentRun, build_looped, seeded_model
    from distill.student_train.train_loop import Stream, WorkerContext, _init_distributed, _loader, _spec, _train_steps

    job = plan_job(cfg)
    variants = cfg.expand()
    lead = variants[0][1]
    ctx = WorkerContext()
    _init_distributed(ctx)
    st = Stream(lead, 1, min(lead.views or job.num_views, job.num_views), min(job.loader_workers, len(job.train)))
    t0 = time.perf_counter()
    batches = list(_loader(_spec(job, st, job.train, 0, True, ctx), ctx.device))
    loader_s = time.perf_counter() - t0
    steps = []
    for name, v in variants:
        s = StudentRun(name, v, Path(cfg.run_dir) / "steps" / name,
                       v.make_loss())
        unit = build_looped(s, job, 1, ctx.device, seeded_model(s, job, ctx.device), Storage(),
                            _train_steps(job, st, 0, 1))
        s.begin_epoch(ctx.device)
        unit.train_step(StepInputs(batches[0], ctx.device, job.num_classes), {name})  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            unit.train_step(StepInputs(b, ctx.device, job.num_classes), {name})
        steps.append(time.perf_counter() - t0)
    return {"loader_s": loader_s, "steps_s": steps, "batches": len(batches)}


def layouts(cfg, k: int, n_steps: int = 20) -> dict:
    """Per-step seconds: K engines (one per student) vs one engine over the K students (one param group each)."""
    import deepspeed

    from distill.core.models import create_model
    from distill.student_train.job_plan import plan_job
    from distill.student_train.student import ds_config

    job = plan_job(cfg)
    variants = cfg.expand()[:k]
    v0 = variants[0][1]
    size = v0.input_size or job.teacher_prep.input_size
    x = torch.randn(v0.batch_size, job.teacher_prep.channels, size, size)
    y = torch.randint(0, job.num_classes, (v0.batch_size,))

    def models() -> list[torch.nn.Module]:
        torch.manual_seed(0)
        return [create_model(v.arch, num_classes=job.num_classes, in_chans=job.teacher_prep.channels,
                             **v.arch_kwargs) for _, v in variants]

    engines = []
    for m, (_, v) in zip(models(), variants, strict=True):
        engines.append(deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=v.lr),
                                            config=ds_config(v))[0])
    one = torch.nn.ModuleList(models())
    opt = torch.optim.AdamW([{"params": m.parameters(), "lr": v.lr} for m, (_, v) in zip(one, variants, strict=True)])
    joint = deepspeed.initialize(model=one, optimizer=opt, config=ds_config(v0, clip=False))[0]

    def k_engines() -> None:
        for e in engines:
            e.backward(torch.nn.functional.cross_entropy(e(x), y))
            e.step()

    def one_engine() -> None:
        joint.backward(sum(torch.nn.functional.cross_entropy(m(x), y) for m in joint.module))
        joint.step()

    out = {}
    for name, fn in (("k_engines_step_s", k_engines), ("one_engine_step_s", one_engine)):
        fn()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            fn()
        out[name] = (time.perf_counter() - t0) / n_steps
    return out


def fusion_bound(k: int, loader_s: float, step_s: float) -> float:
    """The most one shared loader can gain over K loaders: K(L+S)/(L+KS) for per-batch loader cost L and student
    step cost S (K loaders cost K(L+S) per batch of every student; one loader L+KS)."""
    return k * (loader_s + step_s) / (loader_s + k * step_s)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _rounds(data: dict, workload: str, base: Path, k: int, repeats: int) -> list[dict]:
    """`repeats` rounds of group / loader+steps / today, the order reversed every other round (A B C, C B A)."""
    steps = {
        "group": lambda r: timed_run(train_config(data, workload, base / f"group-r{r}", k)),
        "alone": lambda r: loader_and_steps(train_config(data, workload, base / f"alone-r{r}", k)),
        "today": lambda r: timed_run(train_config(data, workload, base / f"today-r{r}", k, fuse="off"))}
    out = []
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        got: dict = {"round": r, "order": order}
        for name in order:
            before = _load()
            got[name] = steps[name](r)
            got[name]["load_1m"] = [before, _load()]
        g, a, t = got["group"], got["alone"], got["today"]
        loader_b, step_b = a["loader_s"] / a["batches"], sum(a["steps_s"]) / len(a["steps_s"]) / a["batches"]
        got.update(speedup_epoch=sum(t["epoch_s"]) / g["epoch_s"][0], speedup_wall=t["wall_s"] / g["wall_s"],
                   efficiency=g["epoch_s"][0] / (a["loader_s"] + sum(a["steps_s"])),
                   loader_per_batch_s=loader_b, step_per_batch_s=step_b, bound=fusion_bound(k, loader_b, step_b))
        out.append(got)
        print(json.dumps({"workload": workload, "k": k, **{x: got[x] for x in ("round", "order", "speedup_epoch",
                                                                               "bound")}}), flush=True)
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--workloads", nargs="+", default=["digits", "photos"])
    ap.add_argument("--photos", type=int, default=256, help="how many 224-px JPEGs")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sweep.json")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of group / loader+steps / today, order alternating")
    ap.add_argument("--digits", type=int, default=None, help="use only this many MNIST digits (quick runs)")
    ap.add_argument("--skip-fused", action="store_true", help="skip the horizontal-fusion and engine-layout runs")
    args = ap.parse_args()
    rows = []
    for workload in args.workloads:
        data = (digits_data(args.work, args.digits) if workload == "digits" else photos_data(args.work, args.photos))
        timed_run(train_config(data, workload, args.work / workload / "warm-up", 2))  # first-run costs, discarded
        for k in args.k:
            base = args.work / workload / f"k{k}"
            row: dict = {"workload": workload, "k": k, "student": STUDENTS[workload]}
            rounds = _rounds(data, workload, base, k, args.repeats)
            row["rounds"] = rounds
            for key in ("speedup_epoch", "speedup_wall", "efficiency", "bound", "loader_per_batch_s",
                        "step_per_batch_s"):
                row[key] = _spread([r[key] for r in rounds])
            row["group_epoch_s"] = _spread([r["group"]["epoch_s"][0] for r in rounds])
            row["today_epochs_s"] = _spread([sum(r["today"]["epoch_s"]) for r in rounds])
            row["loader_s"] = _spread([r["alone"]["loader_s"] for r in rounds])
            row["steps_s"] = _spread([sum(r["alone"]["steps_s"]) for r in rounds])
            row["load_1m"] = _spread([x for r in rounds for n in ("group", "alone", "today") for x in r[n]["load_1m"]])
            if not args.skip_fused:
                fused = timed_run(train_config(data, workload, base / "fused", k, horizontal="on"))
                row.update(fused_epoch_s=fused["epoch_s"][0], fused_wall_s=fused["wall_s"])
                row.update(layouts(train_config(data, workload, base / "layouts", k), k))
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows, args.repeats))


def _m(s: dict, fmt: str, scale: float = 1.0) -> str:
    """median [min-max]"""
    return f"{scale * s['median']:{fmt}} [{scale * s['min']:{fmt}}-{scale * s['max']:{fmt}}]"


def table(rows: list[dict], repeats: int) -> str:
    """The markdown table: medians over the rounds with their range, the bound, the load."""
    out = [f"median [min-max] over {repeats} rounds (order alternating); L, S = loader and student step per batch; "
           "bound = K(L+S)/(L+KS)",
           "| workload | K | group epoch s | loader alone s | sum of steps s | efficiency (<= 1.15) | today s (K "
           "loaders) | **speed-up**, epochs | speed-up, whole runs | L ms | S ms | **bound** | load (1 min) | fused "
           "epoch s | K engines / one engine, per step |", "|---" * 15 + "|"]
    for r in rows:
        fused = f"{r['fused_epoch_s']:.1f}" if "fused_epoch_s" in r else "-"
        layout = (f"{1e3 * r['k_engines_step_s']:.0f} / {1e3 * r['one_engine_step_s']:.0f} ms"
                  if "k_engines_step_s" in r else "-")
        out.append(f"| {r['workload']} | {r['k']} | {_m(r['group_epoch_s'], '.1f')} | {_m(r['loader_s'], '.1f')} | "
                   f"{_m(r['steps_s'], '.1f')} | {_m(r['efficiency'], '.2f')} | {_m(r['today_epochs_s'], '.1f')} | "
                   f"{_m(r['speedup_epoch'], '.2f')} | {_m(r['speedup_wall'], '.2f')} | "
                   f"{_m(r['loader_per_batch_s'], '.0f', 1e3)} | {_m(r['step_per_batch_s'], '.0f', 1e3)} | "
                   f"{_m(r['bound'], '.2f')} | {_m(r['load_1m'], '.1f')} | {fused} | {layout} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""Storage and scale: the cache stage's cost per shard as the number of shards grows, locally and on S3 (moto).

    flock /tmp/heavy.lock .venv/bin/python bench/scale.py [--local 1000 5000 20000] [--s3 1000 5000] [--repeats 2]

Tiny one-sample shards (an 8x8 PNG each) and a trivial teacher (an `mlp` with 8 hidden units at 8 px, 1 view,
in-process, decode in the labelling thread), so what is measured is the per-shard machinery: expand, plan,
read + hash, label, write + checksum + publish, the manifest. For each size: a full pass (seconds per shard, and
the share outside the labeller: what the driver itself spends), the no-op refresh that follows (stage seconds,
best of 3), `distill train` planning over every shard (`plan_job`: the join check of each shard against the
cache, checksums, label counts) and `distill cache inspect`. On S3 (moto's server in its own process) every
request the server receives is counted: requests per shard labelled, and for the no-op.
Goals (issue 23): marginal cost per shard from 5,000 to 20,000 <= 1.3 x that from 1,000 to 5,000 and <= 5 ms;
no-op refresh of 20,000 local shards <= 2 s, of 5,000 S3 objects <= 3 s; <= 3 S3 requests per shard labelled.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# bench/teacher_cache.py is named like the package: keep bench/ off the import path, put tests/ (helpers) on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import encode  # noqa: E402

TEACHER = {"arch": "mlp", "arch_kwargs": {"input_size": 8, "hidden": 8, "depth": 1},
           "preprocessing": {"input_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3,
                             "crop_pct": 1.0}}


def make_shards(directory: Path, n: int) -> None:
    """n one-sample tars (8x8 PNG + label); a tiny tar is mostly its 10 KB of headers and padding."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = directory / f"train-{i:06d}.tar"
        if path.exists():
            continue
        with tarfile.open(path, "w") as tar:
            for ext, data in (("png", encode(rng.integers(0, 255, (8, 8), dtype=np.uint8))), ("cls", b"3")):
                info = tarfile.TarInfo(f"k{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def cache_cfg(shards: str, root: str, ckpt: Path, staging: Path) -> dict:
    return {"shards": [shards], "cache_root": root, "staging_dir": str(staging),
            "teacher": {**TEACHER, "checkpoint": str(ckpt)}, "topk": 5, "views": {"num_views": 1},
            "batch_size": 64, "decode_processes": 0, "ray": {"enabled": False}, "metrics": {"enabled": False},
            "progress": False}


def measure(n: int, shards: str, root: str, ckpt: Path, work: Path, requests: object = None,
            repeats: int = 1) -> dict:
    from distill.student_train.config import TrainConfig
    from distill.student_train.job_plan import plan_job
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    passes = []
    for r in range(repeats):  # each full pass into a fresh cache root; the fastest counts (the machine is shared)
        cfg = CacheConfig.model_validate(cache_cfg(shards, f"{root}-{r}", ckpt, work / "staging"))
        if requests is not None:
            requests.reset()
        t0 = time.perf_counter()
        first = run(cfg)
        full = time.perf_counter() - t0
        assert first.status == "success" and len(first.labelled) == n, first.summary()
        passes.append({"full_s": full, "driver_s": first.seconds - first.label_seconds,
                       "requests_full": sum(requests.snapshot().counts.values()) if requests is not None else 0})
    out = {"n": n, **min(passes, key=lambda p: p["full_s"]), "all_full_s": [p["full_s"] for p in passes]}
    noops = []
    from distill.core.storage import lease

    for _ in range(3):
        if requests is not None:
            requests.reset()
        lease._PROBED.clear()  # probe the store's conditional writes again, as a new `distill cache` process does
        again = run(cfg)
        assert len(again.unchanged) == n and not again.labelled
        noops.append(again.seconds)
    out["noop_s"] = min(noops)
    if requests is not None:
        log = requests.snapshot()
        out["requests_noop"] = sum(log.counts.values())
        out["noop_shard_reads"] = log.object_reads("shards")
    train = TrainConfig.model_validate({
        "run_dir": str(work / "run"), "data": {"train_shards": [shards], "cache_root": f"{root}-{repeats - 1}",
                                               "loader_workers": 0},
        "teacher": {**TEACHER, "checkpoint": str(ckpt)}, "base": {"arch": "cnn_small", "epochs": 1},
        "ray": {"enabled": False}, "twins": False, "variants": [{"name": "kd", "mode": "soft"}]})
    plans = []
    for _ in range(2):  # the first plan on S3 also mirrors the cache; the second finds the mirror
        t0 = time.perf_counter()
        job = plan_job(train)
        plans.append(time.perf_counter() - t0)
        assert len(job.train) == n
    out["plan_first_s"], out["plan_s"] = plans
    from distill.teacher_cache.inspect_cache import inspect_cache

    for verify in (False, True):  # `distill cache inspect` (--no-verify, then with the checksums)
        t0 = time.perf_counter()
        info = inspect_cache(f"{root}-{repeats - 1}", verify=verify)
        out[f"inspect_{'verify' if verify else 'noverify'}_s"] = time.perf_counter() - t0
        assert info["shards"] == n and info["labelled_rows"] == n
    return out


def local_runs(sizes: list[int], work: Path, ckpt: Path, repeats: int) -> list[dict]:
    make_shards(work / "shards", max(sizes))
    rows = []
    for n in sizes:
        pattern = str(work / "shards" / f"train-{{000000..{n - 1:06d}}}.tar")
        rows.append(measure(n, pattern, str(work / f"cache-{n}"), ckpt, work / f"w-{n}", repeats=repeats))
        print(fmt(rows[-1], "local"), flush=True)
    return rows


def s3_runs(sizes: list[int], work: Path, ckpt: Path, repeats: int) -> list[dict]:
    from s3_server import S3_ENV, s3_server_process

    rows = []
    make_shards(work / "shards", max(sizes))
    with s3_server_process() as (endpoint, requests):
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "DISTILL_MIRROR_DIR": str(work / "mirror")})
        from distill.core import object_store

        object_store.reset_filesystem()
        object_store.filesystem().mkdir("s3://shards")
        object_store.filesystem().mkdir("s3://cache")
        for i in range(max(sizes)):
            object_store.put_file(work / "shards" / f"train-{i:06d}.tar", f"s3://shards/train/train-{i:06d}.tar")
        for n in sizes:
            pattern = f"s3://shards/train/train-{{000000..{n - 1:06d}}}.tar"
            rows.append(measure(n, pattern, f"s3://cache/root-{n}", ckpt, work / f"s3-{n}", requests, repeats))
            print(fmt(rows[-1], "s3"), flush=True)
    return rows


def fmt(r: dict, where: str) -> str:
    n = r["n"]
    s = (f"{where:5s} {n:>6,d} shards: full pass {r['full_s']:7.1f} s ({r['full_s'] / n * 1e3:5.2f} ms/shard, "
         f"outside the labeller {r['driver_s'] / n * 1e3:4.2f}), no-op refresh {r['noop_s']:5.2f} s, "
         f"train planning {r['plan_s']:5.2f} s (first {r['plan_first_s']:.2f} s), cache inspect "
         f"{r['inspect_noverify_s']:.2f} s ({r['inspect_verify_s']:.2f} s with checksums)")
    if len(r["all_full_s"]) > 1:
        s += f", passes {', '.join(f'{x:.1f}' for x in r['all_full_s'])} s"
    if r.get("requests_full"):
        s += (f", requests/shard labelled {r['requests_full'] / n:.3f}, no-op requests {r['requests_noop']} "
              f"({r['noop_shard_reads']} shard reads)")
    return s


def marginal(rows: list[dict], where: str) -> None:
    for a, b in zip(rows, rows[1:], strict=False):
        ms = (b["full_s"] - a["full_s"]) / (b["n"] - a["n"]) * 1e3
        own = (b["driver_s"] - a["driver_s"]) / (b["n"] - a["n"]) * 1e3
        print(f"{where}: marginal cost {a['n']:,} -> {b['n']:,}: {ms:.2f} ms/shard ({own:.2f} outside the labeller)")
    if len(rows) >= 3:
        m1 = (rows[1]["full_s"] - rows[0]["full_s"]) / (rows[1]["n"] - rows[0]["n"])
        m2 = (rows[2]["full_s"] - rows[1]["full_s"]) / (rows[2]["n"] - rows[1]["n"])
        print(f"{where}: ratio of marginal costs {m2 / m1:.2f} (goal <= 1.3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", type=int, nargs="*", default=[1000, 5000, 20000])
    ap.add_argument("--s3", type=int, nargs="*", default=[1000, 5000])
    ap.add_argument("--repeats", type=int, default=2, help="full passes per size (the fastest is reported)")
    ap.add_argument("--work", type=Path, default=None, help="keep shards and caches here (default: a temp dir)")
    args = ap.parse_args()
    from distill.core.models import create_model

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        ckpt = work / "teacher.pt"
        torch.save(create_model("mlp", num_classes=10, in_chans=3, **TEACHER["arch_kwargs"]).state_dict(), ckpt)
        if args.local:
            marginal(local_runs(sorted(args.local), work, ckpt, args.repeats), "local")
        if args.s3:
            marginal(s3_runs(sorted(args.s3), work, ckpt, args.repeats), "s3")


if __name__ == "__main__":
    main()

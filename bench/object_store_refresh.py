"""No-op refresh over 1,000 shard objects in object storage: wall time and requests, counted at the S3 server.

    .venv/bin/python bench/object_store_refresh.py [--shards 1000] [--repeats 3]

A real S3 API server (moto's, on 127.0.0.1, as in the tests, in its own process) holds ``--shards`` one-sample
MNIST shards and the cache (``cache_root: s3://...``). The cache is labelled once (in-process teacher, timed
separately), then the no-op refresh (`distill cache refresh` with nothing new) is timed ``--repeats`` times.
Goal (issue 11): ≤ 2 s and 0 reads of shard objects. Every request the server receives is counted by method and bucket.
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

from helpers import cache_cfg_dict, encode, mnist, save_teacher  # noqa: E402
from s3_server import S3_ENV, s3_server_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print where one more no-op refresh spends its time")
    args = ap.parse_args()
    x, y = mnist(args.shards)
    with tempfile.TemporaryDirectory() as tmp, s3_server_process() as (endpoint, requests):
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        from distill.core import object_store
        from distill.teacher_cache.config import CacheConfig
        from distill.teacher_cache.run import run

        fs = object_store.filesystem()
        fs.mkdir("s3://shards")
        fs.mkdir("s3://cache")
        t0 = time.perf_counter()
        for i in range(args.shards):
            path = Path(tmp) / "s.tar"
            with tarfile.open(path, "w") as tar:
                for ext, data in (("png", encode(x[i])), ("cls", str(int(y[i])).encode())):
                    info = tarfile.TarInfo(f"k{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            object_store.put_file(path, f"s3://shards/train/train-{i:06d}.tar")
        upload_s = time.perf_counter() - t0
        ckpt = save_teacher(Path(tmp) / "t.pt")
        pattern = f"s3://shards/train/train-{{000000..{args.shards - 1:06d}}}.tar"
        cfg = CacheConfig.model_validate(cache_cfg_dict([pattern], "s3://cache/root", ckpt,
                                                        staging_dir=str(Path(tmp) / "staging")))
        t0 = time.perf_counter()
        first = run(cfg)
        label_s = time.perf_counter() - t0
        assert first.status == "success" and len(first.labelled) == args.shards, first.summary()
        times = []
        for _ in range(args.repeats):
            requests.reset()
            t0 = time.perf_counter()
            again = run(cfg)
            times.append(time.perf_counter() - t0)
            assert len(again.unchanged) == args.shards and not again.labelled
        log = requests.snapshot()
        reads = log.object_reads("shards")
        total = log.requests("shards") + log.requests("cache")
        counts = dict(sorted((f"{m} {b} {k}", n) for (m, b, k), n in log.counts.items()))
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(run, cfg)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        print(f"machine: {platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}; moto S3 server "
              f"on 127.0.0.1")
        print(f"{args.shards} shard objects: upload {upload_s:.1f} s, first labelling {label_s:.1f} s "
              f"({label_s / args.shards * 1000:.0f} ms/shard incl. manifest PUT)")
        print(f"no-op refresh: {min(times):.2f} s best, {max(times):.2f} s worst of {args.repeats}; "
              f"shard-object reads {reads}; requests of the last refresh: {total} "
              f"({counts})")


if __name__ == "__main__":
    main()

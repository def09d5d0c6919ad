"""Where one cache pass spends its time (issue 31): imports, Ray's start, actor + teacher start, decode wait,
forward, Parquet write; cProfile of the driver thread plus the labeller's own counters.

    PYTHONPATH=. .venv/bin/python bench/profile_pass.py [--images 512] [--shards 4] [--ray] [--top 25]

Same shards and teacher as bench/ray_layout.py. Run it in a fresh process per mode (imports are counted).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import ray  # noqa: F401

    from bench.gpu_check import make_shards
    from bench.ray_layout import make_teacher, pass_config
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run
    t_import = time.perf_counter() - t0
    work = args.work or Path(tempfile.mkdtemp(prefix="profile_pass-"))
    shards = make_shards(work / "shards", args.images, args.shards)
    teacher = make_teacher(work)
    cfg = CacheConfig.model_validate(pass_config(shards, teacher, work / f"cache-{time.time_ns()}",
                                                 [f"ray.enabled={str(args.ray).lower()}"]))
    prof = cProfile.Profile()
    t1 = time.perf_counter()
    prof.enable()
    res = run(cfg)
    prof.disable()
    wall = time.perf_counter() - t1
    stats = pstats.Stats(prof)
    cum = {f"{k[2]}": v[3] for k, v in stats.stats.items()}  # type: ignore[attr-defined]

    def c(name: str) -> float:
        return max((v for k, v in cum.items() if k == name), default=0.0)

    print(f"load {os.getloadavg()}, mode {'ray' if args.ray else 'in-process'}, {res.images} images")
    print(f"interpreter start -> main: {t0 - T_START:.2f} s (before this: python itself)")
    print(f"imports (torch, ray, distill): {t_import:.2f} s")
    print(f"run() wall: {wall:.2f} s = {res.images / wall:.1f} img/s")
    print(f"  prepare (teacher load + fingerprint): {c('prepare'):.2f} s")
    print(f"  connect_ray (Ray's start): {c('connect_ray'):.2f} s")
    print(f"  label_with_ray (actors start + labelling): {c('label_with_ray'):.2f} s")
    print(f"  Labeler.__init__ (in-process): {c('__init__') if not args.ray else 0:.2f} s (max of any __init__)")
    print(f"  inside the labeller(s), summed over shards: label {res.label_seconds:.2f} s = forward "
          f"{res.teacher_seconds:.2f} + wait for decode {res.wait_seconds:.2f} + write {res.write_seconds:.2f} "
          f"+ other {res.label_seconds - res.teacher_seconds - res.wait_seconds - res.write_seconds:.2f}")
    stats.sort_stats("cumulative").print_stats(args.top)
    if args.ray:
        ray.shutdown()


if __name__ == "__main__":
    main()

"""P9 on a CPU box (issue 8 §5): how close the cache pass and the training loader come to pure decoding.

P9(cache)  = cache pass view-images/s with a cheap teacher (cnn_small, V=1) / the decode+resize ceiling
P9(loader) = training loader samples/s alone (no model)                    / the decode+resize ceiling
The ceiling is Pillow decode + resize to the input size in worker processes, one per available core; every
number comes from one run of this script on the same cores and the same JPEG shards.

    PYTHONPATH=. python -m bench.data_path_cpu            # IMAGES=512 SHARDS=4 PX=224 by default
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.gpu_check import make_shards


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def ceiling(shards: list[Path], px: int, procs: int) -> float:
    from distill.images.decode import DecodeSpec
    from distill.images.decode_pool import DecodePool
    from distill.images.shards import ShardReader
    from distill.images.views import ViewPolicy

    raws = [r for s in shards for r in ShardReader(s)]
    pool = DecodePool(DecodeSpec(3, px, "bilinear", ViewPolicy(num_views=1)), procs, chunk=16)
    try:
        list(pool.map(raws[:procs * 4]))
        t0 = time.perf_counter()
        n = sum(1 for _, r in pool.map(raws) if not isinstance(r, str))
        return n / (time.perf_counter() - t0)
    finally:
        pool.close()


def cache_rate(shards: list[Path], work: Path, px: int, procs: int) -> tuple[float, Path]:
    from distill.core.models import create_model
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    ckpt = work / "cnn_small.pt"
    torch.manual_seed(0)
    torch.save(create_model("cnn_small", num_classes=1000, in_chans=3).state_dict(), ckpt)
    cfg = CacheConfig.model_validate({
        "shards": [str(s) for s in shards], "cache_root": str(work / "cache"), "topk": 10,
        "views": {"num_views": 1}, "teacher": {"arch": "cnn_small", "checkpoint": str(ckpt),
                                               "preprocessing": {"input_size": px}},
        "batch_size": 64, "ray": {"enabled": False}, "metrics": {"enabled": False}, "progress": False,
        "decode_processes": procs})
    res = run(cfg)
    assert res.status == "success", res.failed
    return res.images / res.seconds, res.cache_dir


def loader_rate(shards: list[Path], cache_dir: Path, px: int, procs: int) -> float:
    from distill.images.preprocessing import Preprocessing
    from distill.student_train.data import JoinedStream, ShardPair, StreamSpec
    from distill.teacher_cache.reader import CacheReader

    reader = CacheReader(cache_dir)
    pairs = [ShardPair(s.stem, s, reader.manifest.shards[s.stem].rows) for s in shards]
    prep = Preprocessing(px, 0.875, (0.5,) * 3, (0.5,) * 3, "bilinear", 3)
    spec = StreamSpec(cache_dir=cache_dir, pairs=pairs, student=prep, teacher=None, num_classes=1000,
                      views=1, train=True, batch_size=64, shuffle_buffer=64, seed=0, epoch=0,
                      rank=0, world=1, loader_workers=procs)
    loader = torch.utils.data.DataLoader(JoinedStream(spec), batch_size=None, num_workers=procs,
                                         prefetch_factor=4)
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    work = Path(os.environ.get("WORK", "bench/out/data_path_cpu"))
    px, procs = _env("PX", 224), _env("PROCS", len(os.sched_getaffinity(0)))
    shards = make_shards(work / "shards", _env("IMAGES", 512), _env("SHARDS", 4))
    c = ceiling(shards, px, procs)
    cache, cache_dir = cache_rate(shards, work, px, procs)
    load = loader_rate(shards, cache_dir, px, procs)
    print(f"cores {len(os.sched_getaffinity(0))}, processes {procs}, {px}px")
    print("| what | img/s |\n|---|---|")
    print(f"| decode+resize ceiling, Pillow in {procs} processes | {c:,.0f} |")
    print(f"| cache pass, cnn_small teacher, V=1 (whole run incl. teacher load) | {cache:,.0f} |")
    print(f"| training loader alone ({procs} loader workers) | {load:,.0f} |")
    print(f"P9 cache = {cache / c:.2f}; P9 loader = {load / c:.2f}  (goal >= 0.8 each)")


if __name__ == "__main__":
    main()

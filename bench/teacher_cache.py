"""Teacher-cache benchmark: forward-only limit vs the whole cache pass, storage, reconstruction KL, no-op refresh.

    .venv/bin/python bench/teacher_cache.py [--samples 96] [--views 2] [--arch resnet50] [--threads 2]

Images: the two real photographs that ship inside scikit-learn (china.jpg, flower.jpg, 427x640), cut into
``--samples`` different real crops of 300-427 px and re-encoded as JPEG, so decode cost is that of real photos.
Teacher: a timm ResNet at 224x224 with random weights (no hub here); throughput does not depend on weights.
Everything runs in one process with the same threads and batch size, so the ratios are fair.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the package it measures: keep bench/ off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np
import torch
from PIL import Image

from distill.teacher.load import load_teacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.fingerprint import fingerprint
from distill.teacher_cache.labeler import Labeler
from distill.teacher_cache.reader import CacheReader
from distill.teacher_cache.run import run
from distill.teacher_cache.topk import pack_topk, rebuild_log_probs


def make_shards(out: Path, samples: int, per_shard: int) -> list[Path]:
    import tarfile

    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, samples, per_shard):
        p = out / f"photos-{s // per_shard:06d}.tar"
        with tarfile.open(p, "w") as tar:
            for i in range(s, min(samples, s + per_shard)):
                photo = photos[i % 2]
                h = int(rng.integers(300, 428))
                w = int(rng.integers(300, 640))
                top, left = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
                buf = io.BytesIO()
                Image.fromarray(photo[top:top + h, left:left + w]).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"photo_{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(p)
    return paths


def forward_only(cfg: CacheConfig, n_images: int) -> float:
    """Images/s of the teacher alone on ready, preprocessed tensors: the limit for the cache pass."""
    teacher = load_teacher(cfg.teacher)
    x = torch.randn(cfg.batch_size, 3, teacher.preprocessing.input_size, teacher.preprocessing.input_size)
    with torch.inference_mode():
        teacher.model(x)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n_images:
            logits = teacher.model(x)
            pack_topk(logits, cfg.topk)
            done += len(x)
    return done / (time.perf_counter() - t0)


def kl_against_full(cfg: CacheConfig, shards: list[Path], temps: tuple[float, ...]) -> dict[str, float]:
    teacher = load_teacher(cfg.teacher)
    lab = Labeler(cfg, "bench", teacher)
    from distill.images.decode import try_decode_cpu
    from distill.images.shards import ShardReader
    from distill.images.views import normalize

    prep = teacher.preprocessing
    pix = [d.pixels[0] for d in (try_decode_cpu(r, lab.spec) for r in ShardReader(shards[0]))
           if not isinstance(d, str)]
    with torch.inference_mode():
        z = teacher.model(normalize(torch.stack(pix), prep.mean, prep.std)).float()
    ids, vals, tail = pack_topk(z, cfg.topk)
    out = {}
    for t in temps:
        full = torch.log_softmax(z / t, 1)
        rebuilt = rebuild_log_probs(ids.to(torch.int16), vals.half(), tail, z.shape[1], t)
        out[f"T={t:g}"] = float((full.exp() * (full - rebuilt)).sum(1).mean())
    out["topk_mass_T1"] = float(vals.exp().sum(1).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--per-shard", type=int, default=96)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--arch", default="timm:resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/out/teacher_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        shards = make_shards(work, args.samples, args.per_shard)
        torch.manual_seed(0)
        from distill.core.models import create_model

        ckpt = work / "teacher.pt"
        torch.save(create_model(args.arch, num_classes=1000).state_dict(), ckpt)
        cfg = CacheConfig.model_validate({
            "shards": [str(p) for p in shards], "cache_root": str(work / "cache"),
            "teacher": {"arch": args.arch, "checkpoint": str(ckpt)}, "topk": args.topk,
            "views": {"num_views": args.views}, "batch_size": args.batch, "torch_threads": args.threads,
            "ray": {"enabled": False}, "progress": False,
            "metrics": {"enabled": False}})
        n_views = args.samples * args.views
        limit = forward_only(cfg, n_views)
        t0 = time.perf_counter()
        res = run(cfg)
        full_s = time.perf_counter() - t0
        cache_rate = n_views / full_s
        t1 = time.perf_counter()
        noop = run(cfg)
        noop_s = time.perf_counter() - t1
        assert noop.labelled == [] and len(noop.unchanged) == len(shards)
        reader = CacheReader(res.cache_dir)
        cache_bytes = sum(e.file_bytes for e in reader.manifest.shards.values())
        per_sv = cache_bytes / n_views
        import pyarrow.parquet as pq

        footer = sum(pq.ParquetFile(reader.path(s)).metadata.serialized_size for s in reader.shards)
        payload_per_sv = (cache_bytes - footer) / n_views
        footer_per_file = footer / len(reader.shards)
        per_sv_1k = payload_per_sv + footer_per_file / (1000 * args.views)
        teacher = load_teacher(cfg.teacher)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "arch": args.arch, "input": teacher.preprocessing.input_size, "samples": args.samples,
            "views": args.views, "batch": args.batch, "threads": args.threads,
            "forward_only_img_s": limit, "cache_pass_img_s": cache_rate, "ratio": cache_rate / limit,
            "cache_pass_seconds": full_s, "teacher_seconds_in_pass": res.teacher_seconds,
            "bytes_per_sample_view": per_sv, "fp32_dense_bytes": 4 * teacher.num_classes,
            "size_fraction_of_fp32": per_sv / (4 * teacher.num_classes),
            "payload_bytes_per_sample_view": payload_per_sv, "footer_bytes_per_file": footer_per_file,
            "bytes_per_sample_view_at_1000_per_shard": per_sv_1k,
            "size_fraction_of_fp32_at_1000_per_shard": per_sv_1k / (4 * teacher.num_classes),
            "noop_refresh_seconds": noop_s, "noop_fraction": noop_s / full_s,
            "kl": kl_against_full(cfg, shards, (1.0, 2.0, 4.0)),
            "fingerprint": fingerprint(teacher, cfg),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

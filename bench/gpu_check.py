"""One bounded check of the data path on whatever machine this runs on (issue 8 §4): ceilings, then the project.

No Ray: the in-process cache pass and `torchrun` training. Makes its own JPEG shards from the two photos that ship
inside scikit-learn (random crops resized to about 500x375). Sizes come from the environment (see SIZES); on a
machine without CUDA the nvjpeg line is skipped and everything runs in fp32 on the CPU.

    SIZE=tiny bash bench/gpu_check.sh     # a couple of minutes on a 2-core CPU box (how the script is tested)
    SIZE=full bash bench/gpu_check.sh     # the GPU check: 4,096 images, resnet50 teacher, resnet18 student

The last line trains K = 8 students of the student architecture (an lr sweep, one data stream) fused into one
model (issue 22: grouped convolutions, bf16 on CUDA) and reports their aggregate samples/s against 8 x the single
student's step ceiling.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

SIZES = {  # images, shards, teacher, student, input px, batch, train epochs
    "tiny": dict(images=96, shards=2, teacher="resnet_mini", student="cnn_small", px=64, batch=16, epochs=2),
    "full": dict(images=4096, shards=16, teacher="timm:resnet50", student="timm:resnet18", px=224, batch=256,
                 epochs=2),
}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
AMP = torch.bfloat16 if CUDA else None


def params() -> dict:
    p = dict(SIZES[os.environ.get("SIZE", "tiny")])
    for k in p:
        if (v := os.environ.get(k.upper())) is not None:
            p[k] = type(p[k])(v)
    p["cpus"] = len(os.sched_getaffinity(0))
    p["workers"] = int(os.environ.get("DECODE_PROCS", max(1, p["cpus"] - 2)))
    return p


def make_shards(out: Path, n: int, shards: int, classes: int = 1000) -> list[Path]:
    """JPEGs of about 500x375 (q=90) cut from scikit-learn's two sample photos, with a .cls each."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"bench-{s:06d}.tar" for s in range(shards)]
    per = -(-n // shards)
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                ph = photos[i % 2]
                w, h = int(rng.integers(300, 640)), int(rng.integers(240, 427))
                x, y = int(rng.integers(0, ph.width - w + 1)), int(rng.integers(0, ph.height - h + 1))
                im = ph.crop((x, y, x + w, y + h)).resize((500, 375), Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(int(rng.integers(classes))).encode())):
                    info = tarfile.TarInfo(f"img{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn, n_items: int, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return n_items * repeats / (time.perf_counter() - t0)


def teacher_ceiling(p: dict, arch: str) -> float:
    """Forward img/s of the teacher, bf16 autocast + channels_last on CUDA (fp32 on the CPU), random weights."""
    from distill.core.models import create_model

    model = create_model(arch, num_classes=1000, in_chans=3).eval().to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(p["batch"], 3, p["px"], p["px"], device=DEVICE).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=AMP or torch.float32, enabled=AMP is not None):
            model(x)
    return _timed(step, p["batch"], max(3, 2048 // p["batch"]) if CUDA else 3)


def student_ceiling(p: dict) -> float:
    """Train-step img/s (fwd + bwd + AdamW) of the student on random data, bf16 + channels_last on CUDA."""
    from distill.core.models import create_model

    model = create_model(p["student"], num_classes=1000, in_chans=3).to(DEVICE, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(p["batch"], 3, p["px"], p["px"], device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (p["batch"],), device=DEVICE)

    def step() -> None:
        with torch.autocast(DEVICE.type, dtype=AMP or torch.float32, enabled=AMP is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(step, p["batch"], max(3, 2048 // p["batch"]) if CUDA else 3)


def decode_ceilings(p: dict, shards: list[Path]) -> dict[str, float | None]:
    """Decode + resize to px (one view): Pillow in worker processes, and nvjpeg batched on the GPU."""
    from distill.images.decode import DecodeSpec, decode_batch_gpu
    from distill.images.decode_pool import DecodePool
    from distill.images.shards import ShardReader
    from distill.images.views import ViewPolicy

    raws = [r for s in shards for r in ShardReader(s)]
    spec = DecodeSpec(3, p["px"], "bilinear", ViewPolicy(num_views=1))
    pool = DecodePool(spec, p["workers"], chunk=16)
    try:
        list(pool.map(raws[: 4 * p["workers"]]))  # start the processes
        t0 = time.perf_counter()
        n = sum(1 for _, r in pool.map(raws) if not isinstance(r, str))
        out: dict[str, float | None] = {"pil_procs": n / (time.perf_counter() - t0)}
    finally:
        pool.close()
    out["nvjpeg"] = None
    if CUDA:
        chunks = [raws[i:i + p["batch"]] for i in range(0, len(raws), p["batch"])]
        decode_batch_gpu(chunks[0], spec, DEVICE)
        _sync()
        t0 = time.perf_counter()
        n = sum(sum(1 for r in decode_batch_gpu(c, spec, DEVICE) if not isinstance(r, str)) for c in chunks)
        _sync()
        out["nvjpeg"] = n / (time.perf_counter() - t0)
    return out


def teacher_checkpoint(p: dict, work: Path) -> Path:
    from distill.core.models import create_model

    path = work / "teacher.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(create_model(p["teacher"], num_classes=1000, in_chans=3).state_dict(), path)
    return path


def cache_config(p: dict, shards: list[Path], work: Path, views: int) -> dict:
    return {"shards": [str(s) for s in shards], "cache_root": str(work / f"cache_v{views}"), "topk": 10,
            "views": {"num_views": views},
            "teacher": {"arch": p["teacher"], "checkpoint": str(teacher_checkpoint(p, work)),
                        "preprocessing": {"input_size": p["px"]}},
            "batch_size": p["batch"], "ray": {"enabled": False}, "metrics": {"enabled": False}, "progress": False,
            "decode_processes": p["workers"]}


def cache_pass(p: dict, shards: list[Path], work: Path, views: int) -> tuple[float, float]:
    """The cache pass as `distill cache --no-ray` runs it, shard by shard in this process.

    Returns (view-images/s over the labelling of shards 2..n, the same for the whole `run()` including the
    teacher load and manifest). Shard 1 warms up the labeller (cuDNN autotune, decode processes).
    """
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.labeler import Labeler, ShardTask
    from distill.teacher_cache.run import prepare, run

    cfg = CacheConfig.model_validate(cache_config(p, shards, work, views))
    teacher, fp = prepare(cfg)
    lab = Labeler(cfg, fp, teacher)
    try:
        lab.label_shard(ShardTask(shards[0].stem, shards[0], work / "scratch"))
        t0 = time.perf_counter()
        rows = sum(lab.label_shard(ShardTask(s.stem, s, work / "scratch")).rows for s in shards[1:])
        steady = rows * views / (time.perf_counter() - t0)
    finally:
        lab.close()
    t0 = time.perf_counter()
    res = run(cfg)  # the real entry point, writes the cache that training reads
    if res.status != "success":
        raise RuntimeError(f"cache pass V={views} failed: {res.failed}")
    return steady, res.images * views / (time.perf_counter() - t0)


def train_rate(p: dict, shards: list[Path], work: Path, mode: str) -> float:
    """`torchrun --nproc_per_node 1 -m distill train` for one variant; samples/s of its last epoch."""
    cache = cache_config(p, shards, work, 4)
    cfg = {"run_dir": str(work / "train"), "device": "auto", "log_every": 50, "metrics_port": None,
           "ray": {"enabled": False}, "teacher": cache["teacher"],
           "data": {"train_shards": [str(s) for s in shards], "cache_root": cache["cache_root"],
                    "loader_workers": min(p["workers"], len(shards)), "shuffle_buffer": 64},
           "base": {"arch": p["student"], "mode": mode, "epochs": p["epochs"], "batch_size": p["batch"],
                    "input_size": p["px"], "precision": "bf16" if CUDA else "fp32", "warmup_epochs": 0.0},
           "variants": [{"name": f"bench-{mode}"}]}
    path = work / f"train-{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "distill", "train", "-c", str(path), "--variant", f"bench-{mode}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=int(os.environ.get("TRAIN_TIMEOUT", 600)))
    if done.returncode != 0:
        raise RuntimeError(f"train {mode} exited {done.returncode}: {done.stderr[-1500:]}")
    import csv

    with open(work / "train" / f"bench-{mode}" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["samples_per_s"])


def fused_rate(p: dict, shards: list[Path], work: Path, k: int = 8) -> tuple[float, str]:
    """`torchrun ... train` of K students of the student arch (an lr sweep: one data stream, one group) fused into
    one model (train.horizontal: on), bf16 on CUDA; (aggregate samples/s of the last epoch, fused or why not)."""
    cache = cache_config(p, shards, work, 4)
    cfg = {"run_dir": str(work / "train_fused"), "device": "auto", "log_every": 50, "metrics_port": None,
           "ray": {"enabled": False}, "teacher": cache["teacher"], "horizontal": "on", "twins": False,
           "data": {"train_shards": [str(s) for s in shards], "cache_root": cache["cache_root"],
                    "loader_workers": min(p["workers"], len(shards)), "shuffle_buffer": 64},
           "base": {"arch": p["student"], "mode": "soft", "epochs": p["epochs"], "batch_size": p["batch"],
                    "input_size": p["px"], "precision": "bf16" if CUDA else "fp32", "warmup_epochs": 0.0},
           "variants": [{"name": f"fused-{i}", "lr": 2e-4 * (i + 1)} for i in range(k)]}
    path = work / "train-fused.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "distill", "train", "-c", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=int(os.environ.get("TRAIN_TIMEOUT", 600)))
    if done.returncode != 0:
        raise RuntimeError(f"train fused exited {done.returncode}: {done.stderr[-1500:]}")
    import csv

    rates = []
    for i in range(k):
        with open(work / "train_fused" / f"fused-{i}" / "metrics.csv") as f:
            rates.append(float(list(csv.DictReader(f))[-1]["samples_per_s"]))
    how = "fused" if "fused into one model" in (work / "train_fused" / "plan.txt").read_text() and \
        "not fused" not in done.stderr else "looped (not fusable: see the log)"
    return sum(rates), how


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def report(p: dict, r: dict) -> str:
    """The table: measured rates, then issue 8's ratios with their goals."""
    lines = [f"machine: {torch.cuda.get_device_name(0) if CUDA else 'CPU only'}, {p['cpus']} CPUs, "
             f"torch {torch.__version__}; size {os.environ.get('SIZE', 'tiny')}: {p}", "",
             "| what | rate |", "|---|---|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v:,.0f} |" if isinstance(v, float) else f"| {k} | {v or 'n/a (no CUDA)'} |")
    lim = 1 + r["student step ceiling (img/s)"] / r["teacher forward ceiling (img/s)"]
    ratios = [
        # issue 31: the pass against the teacher's own forward on preloaded tensors (bf16 on CUDA), one view per
        # image: the decoder (nvjpeg or processes) must keep up with the teacher for this to reach the goal
        ("cache V=1 / teacher forward ceiling", _ratio(r["cache V=1 (view-img/s)"],
                                                        r["teacher forward ceiling (img/s)"]), ">= 0.8 (GPU)"),
        ("cache V=4 / teacher forward ceiling", _ratio(r["cache V=4 (view-img/s)"],
                                                        r["teacher forward ceiling (img/s)"]), ">= 0.8"),
        ("cache V=1 / nvjpeg ceiling", _ratio(r["cache V=1 (view-img/s)"], r["decode nvjpeg (img/s)"]), ">= 0.8"),
        ("train none / student step ceiling", _ratio(r["train none (samples/s)"],
                                                      r["student step ceiling (img/s)"]), ">= 0.7"),
        ("train soft / train none", _ratio(r["train soft (samples/s)"], r["train none (samples/s)"]), ">= 0.95"),
        ("(soft / online) / its limit", _ratio(r["train soft (samples/s)"] / r["train online (samples/s)"], lim),
         ">= 0.9"),
        ("cache V=1 / PIL-process decode ceiling", _ratio(r["cache V=1 (view-img/s)"],
                                                         r["decode PIL procs (img/s)"]), "(CPU: P9 >= 0.8)"),
        (f"train fused K=8 aggregate / (8 x student step ceiling) [{r['train fused K=8 how']}]",
         _ratio(r["train fused K=8 aggregate (samples/s)"], 8 * r["student step ceiling (img/s)"]),
         "(report; 1/8 = one student's ceiling shared by 8)"),
    ]
    lines += ["", "| ratio | value | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in ratios]
    return "\n".join(lines)


def main() -> None:
    p = params()
    work = Path(os.environ.get("WORK", "bench/out/gpu_check"))
    shards = make_shards(work / "shards", p["images"], p["shards"])
    r: dict = {}
    steps = [
        ("teacher forward ceiling (img/s)", lambda: teacher_ceiling(p, p["teacher"])),
        ("student step ceiling (img/s)", lambda: student_ceiling(p)),
        ("decode", lambda: decode_ceilings(p, shards)),
        ("cache V=1 (view-img/s)", lambda: cache_pass(p, shards, work, 1)),
        ("cache V=4 (view-img/s)", lambda: cache_pass(p, shards, work, 4)),
        *[(f"train {m} (samples/s)", lambda m=m: train_rate(p, shards, work, m)) for m in ("none", "soft", "online")],
        ("train fused K=8", lambda: fused_rate(p, shards, work)),
    ]
    for name, fn in steps:
        t0 = time.perf_counter()
        out = fn()
        if name == "decode":
            r["decode PIL procs (img/s)"], r["decode nvjpeg (img/s)"] = out["pil_procs"], out["nvjpeg"]
        elif name.startswith("cache"):
            r[name], r[name.replace("(view-img/s)", "whole run() incl. load (view-img/s)")] = out
        elif name == "train fused K=8":
            r["train fused K=8 aggregate (samples/s)"], r["train fused K=8 how"] = out
        else:
            r[name] = out
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {out}", flush=True)
    (work / "gpu_check.json").write_text(json.dumps({"params": p, "results": r}, indent=1))
    print(report(p, r))


if __name__ == "__main__":
    main()

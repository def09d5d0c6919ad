"""Cache pass: our Ray path against a plain Ray Data pipeline doing the same work (issue 23 item 4).

Same shards (2,048 JPEGs of 500x375 cut from scikit-learn's sample photos, 8 shards), same teacher (timm
`mobilenetv3_small_050` at 224, TorchScript, random weights: only speed is measured), 1 view, top-10,
batch 32, same cores, one local Ray cluster per pipeline run (Ray's start counted for every Ray pipeline).

    flock /tmp/heavy.lock .venv/bin/python bench/ray_layout.py [--images 2048] [--shards 8] [--repeats 2]
        [--layout NAME:key=value,key=value ...]

Pipelines (repeats interleaved, the best of each counts; img/s = images / wall seconds of the whole call):
- `ray`: `distill cache` with Ray and its default layout (teacher_cache/layout.py);
- `noray`: `distill cache --no-ray` (in-process, the same layout rule for decode processes and threads);
- each `--layout NAME:overrides`: `distill cache` with those config overrides (e.g.
  `2x1:ray.num_actors=2,ray.cpus_per_actor=1`);
- `raydata`: `ray.data.read_webdataset(decoder=None)` -> `map_batches` (Pillow decode, resize 256, centre crop
  224, normalise; tasks) -> `map_batches` (the teacher in a callable class, 1 actor x 1 CPU, top-10 + tail
  log-sum-exp) -> `write_parquet`. Of the Ray Data layouts tried (1 or 2 teacher actors, decode fused into the
  teacher's class or in tasks before it), this one was the fastest on 2 cores.
Goal: our Ray path >= 1.2 x Ray Data's img/s; the in-process path keeps its lead.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

PX, RESIZE, TOPK, BATCH = 224, 256, 10, 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_teacher(work: Path) -> Path:
    import timm

    path = work / "mobilenetv3_small_050.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000).eval()
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def parse_layout(text: str) -> tuple[str, list[str]]:
    """`NAME:key=value,key=value` -> (NAME, the `--set` overrides)."""
    name, _, rest = text.partition(":")
    return name, [item for item in rest.split(",") if item]


def pass_config(shards: list[Path], teacher: Path, root: Path, overrides: list[str]) -> dict:
    """The `distill cache` config of the benchmark, with `--set`-style overrides applied."""
    from distill.cluster.config_loading import apply_overrides

    cfg = {"shards": [str(s) for s in shards], "cache_root": str(root), "topk": TOPK,
           "views": {"num_views": 1}, "batch_size": BATCH, "metrics": {"enabled": False}, "progress": False,
           "tracking": {"enabled": False},  # MLflow is no part of the compared job (profile_pass.py: 11 s under load)
           "teacher": {"scripted": str(teacher), "num_classes": 1000,
                       "preprocessing": {"input_size": PX, "crop_pct": PX / RESIZE, "mean": MEAN, "std": STD}}}
    apply_overrides(cfg, overrides)  # what `distill cache --set` does
    return cfg


def our_pass(shards: list[Path], teacher: Path, root: Path, overrides: list[str]) -> dict:
    """One `distill cache` run in this process; Ray (when enabled) is started and shut down inside the call."""
    import ray

    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    cfg = pass_config(shards, teacher, root, overrides)
    t0 = time.perf_counter()
    res = run(CacheConfig.model_validate(cfg))
    wall = time.perf_counter() - t0
    if ray.is_initialized():
        ray.shutdown()
    assert res.status == "success", res.summary()
    return {"images": res.images, "wall_s": wall, "stage_s": res.seconds}


def decode_batch(batch: dict) -> dict:
    """Ray Data task: JPEG bytes -> normalised 224x224 CHW float32 (resize the short side to 256, centre crop).
    A task, not an actor: two actors holding both CPUs of this machine starve the read tasks forever."""
    from PIL import Image

    out = np.empty((len(batch["jpg"]), 3, PX, PX), np.float32)
    for i, data in enumerate(batch["jpg"]):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = RESIZE / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
        x, y = (im.width - PX) // 2, (im.height - PX) // 2
        a = np.asarray(im.crop((x, y, x + PX, y + PX)), np.float32) / 255.0
        out[i] = ((a - MEAN) / STD).transpose(2, 0, 1)
    return {"__key__": batch["__key__"], "image": out}


class _Teacher:
    """Ray Data actor: the TorchScript teacher, top-10 log-probabilities and the tail's log-sum-exp."""

    def __init__(self, path: str) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("RAYDATA_TORCH_THREADS", "1"))))
        self.model = torch.jit.load(path).eval()

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            logp = torch.log_softmax(self.model(torch.from_numpy(np.ascontiguousarray(batch["image"]))), -1)
        top, ids = logp.topk(TOPK, -1)
        rest = logp.scatter(-1, ids, float("-inf"))
        return {"__key__": batch["__key__"], "topk_ids": ids.numpy().astype(np.int16),
                "topk_logits": top.numpy().astype(np.float16), "tail_lse": torch.logsumexp(rest, -1).numpy()}


def raydata_pass(shards: list[Path], teacher: Path, out: Path) -> dict:
    import ray

    from distill.core.ray_cluster import connect_ray

    t0 = time.perf_counter()
    connect_ray(None)
    started = time.perf_counter()
    ds = ray.data.read_webdataset([str(s) for s in shards], decoder=None)
    ds = ds.map_batches(decode_batch, batch_size=BATCH)
    ds = ds.map_batches(_Teacher, fn_constructor_args=(str(teacher),), batch_size=BATCH, concurrency=1,
                        num_cpus=1)
    ds.write_parquet(str(out))
    wall = time.perf_counter() - t0
    images = sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))
    ray.shutdown()
    return {"images": images, "wall_s": wall, "stage_s": wall - (started - t0)}


def run_one(name: str, overrides: list[str], shards: list[Path], teacher: Path, work: Path, r: int) -> dict:
    out = work / f"{name}-{r}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache (or Ray Data output) every run: nothing is skipped
    if name == "raydata":
        return raydata_pass(shards, teacher, out)
    return our_pass(shards, teacher, out, overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layout", action="append", default=[], help="NAME:key=value,... extra `distill cache` "
                    "layouts (config overrides)")
    ap.add_argument("--only", nargs="*", help="run only these pipelines (names)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "REPEAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    from bench.gpu_check import make_shards

    work = args.work or Path(tempfile.mkdtemp(prefix="ray_layout-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work / "shards", args.images, args.shards)
    teacher = make_teacher(work)
    pipelines = {"ray": ["ray.enabled=true"], "noray": ["ray.enabled=false"], "raydata": []}
    pipelines.update(parse_layout(text) for text in args.layout)
    if args.only:
        pipelines = {k: v for k, v in pipelines.items() if k in args.only}

    if args.child:  # one pipeline run in a fresh process (no Ray or torch state carried between runs)
        name, r = args.child[0], int(args.child[1])
        print("RESULT " + json.dumps(run_one(name, pipelines[name], shards, teacher, work, r)), flush=True)
        return

    results: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name in pipelines:
            cmd = [sys.executable, __file__, "--images", str(args.images), "--shards", str(args.shards),
                   "--work", str(work), "--child", name, str(r)] + [f"--layout={t}" for t in args.layout]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(
                Path(__file__).resolve().parents[1])})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{name} (repeat {r}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            res = json.loads(line[7:])
            res["img_s"] = res["images"] / res["wall_s"]
            results[name].append(res)
            print(f"{name:>10} repeat {r}: {res['images']} images, {res['wall_s']:.1f} s wall "
                  f"({res['stage_s']:.1f} s in the stage), {res['img_s']:.1f} img/s", flush=True)

    best = {name: max(rs, key=lambda x: x["img_s"]) for name, rs in results.items()}
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, {args.images} JPEGs 500x375 in {args.shards} shards, "
          f"mobilenetv3_small_050 @ {PX}, V=1, top-{TOPK}, batch {BATCH}; best of {args.repeats}")
    print("| pipeline | img/s (wall, Ray's start included) | all runs img/s |")
    print("|---|---:|---|")
    for name, rs in results.items():
        runs = ", ".join(f"{x['img_s']:.1f}" for x in rs)
        print(f"| {name} | {best[name]['img_s']:.1f} | {runs} |")
    if "raydata" in best:
        for name in best:
            if name != "raydata":
                print(f"{name} / raydata = {best[name]['img_s'] / best['raydata']['img_s']:.2f}x (goal for ray: 1.2x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

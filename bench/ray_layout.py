"""Cache pass: `distill cache` (in-process and on Ray) against the strongest Ray Data pipeline for the same job,
and against the shared-core limit (issue 31).

Same shards (JPEGs of 500x375 cut from scikit-learn's sample photos), same teacher (timm `mobilenetv3_small_050`
at 224, TorchScript, random weights: only speed is measured), 1 view, top-10, batch 32, same cores.

    PYTHONPATH=. .venv/bin/python bench/ray_layout.py [--images 512] [--shards 4] [--repeats 3] [--contention]
        [--only NAME ...] [--layout NAME:key=value,...]      (the issue's size: --images 2048 --shards 8)

Every run is a fresh process (no Ray or torch state carried over), the order of the pipelines alternates
between repeats, and each pipeline's median and spread (min-max) are reported with the 1-minute load. img/s =
images / wall seconds of the pass, **Ray's start included for every Ray pipeline** (imports excluded for all);
Ray's start is also reported apart. Pipelines:
- `ray`: `distill cache` with Ray and its defaults: on the local cluster it starts, the driver labels shards while
  Ray and the actor start (teacher_cache/head_start.py; how many is reported); `ray_plain`: the same with
  `ray.label_while_starting: false` (the actors label everything); `noray`: `distill cache --no-ray`; each
  `--layout NAME:overrides`: `distill cache` with those config overrides;
- Ray Data, all `read_webdataset(decoder=None)` -> ... -> `write_parquet`, the teacher in a callable class
  (top-10 + tail log-sum-exp), Pillow decode (resize 256, centre crop 224, normalise):
  `rd_actor` decode inside the teacher actor, 1 actor, 2 torch threads; `rd_actor1` the same with 1 thread;
  `rd_tasks` decode in tasks feeding a 1-thread teacher actor; `rd_2actors` decode inside the actor, 2 actors
  x 1 thread (0.5 CPU each, so the read tasks are never starved). The fastest by median on the quiet machine
  is the peer (the run prints which; on the quiet 2-core VM of 2026-12-06 it was `rd_2actors`: BENCHMARKS.md);
- `limit`: the shared-core limit 1 / (1/decode + 1/forward) from the labeller's own decode (all images, its
  reading thread) and its own forward step on the decoded batches (normalise + forward + top-k), with the
  threads the labeller chose, in one process. pass / limit uses the pass's labelling rate (images / seconds
  inside the labeller: Ray's start, the actor's and the teacher's start excluded).
`--contention` measures everything again with a CPU-bound busy loop pinned on one core (sched_setaffinity in a
child process) and reports each pipeline's ratio to the peer quiet vs contended.
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


RD_VARIANTS = {  # name: (decode inside the teacher actor, actors, CPUs per actor, torch threads)
    "rd_actor": (True, 1, 1.0, 2), "rd_actor1": (True, 1, 1.0, 1), "rd_tasks": (False, 1, 1.0, 1),
    "rd_2actors": (True, 2, 0.5, 1)}


def our_pass(shards: list[Path], teacher: Path, root: Path, overrides: list[str]) -> dict:
    """One `distill cache` run in this process; Ray (when enabled) is started inside the timing, apart too."""
    import ray

    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    cfg = CacheConfig.model_validate(pass_config(shards, teacher, root, overrides))
    t0 = time.perf_counter()
    res = run(cfg)  # starts Ray itself (timed apart inside: res.ray_start_seconds)
    wall = time.perf_counter() - t0
    if ray.is_initialized():
        ray.shutdown()
    assert res.status == "success", res.summary()
    return {"images": res.images, "wall_s": wall, "ray_start_s": res.ray_start_seconds, "label_s": res.label_seconds,
            "forward_s": res.teacher_seconds, "wait_s": res.wait_seconds, "write_s": res.write_seconds,
            "on_driver": len(res.labelled_on_driver)}


def limit_run(shards: list[Path], teacher: Path, root: Path) -> dict:
    """Decode-only and forward-only rates of the labeller (its threads, its decode, its forward step)."""
    from distill.images.shards import ShardReader
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.labeler import Labeler

    cfg = CacheConfig.model_validate(pass_config(shards, teacher, root, ["ray.enabled=false"]))
    lab = Labeler(cfg, "limit")
    try:
        t0 = time.perf_counter()
        decoded = [item for s in shards for _, item in lab.pool.map(ShardReader(s)) if not isinstance(item, str)]
        decode_s = time.perf_counter() - t0
        batches = [decoded[i:i + BATCH] for i in range(0, len(decoded), BATCH)]
        lab._teacher_step(batches[0])  # warm-up, as the pass's first batch
        t1 = time.perf_counter()
        for b in batches:
            lab._teacher_step(b)
        forward_s = time.perf_counter() - t1
        threads = torch.get_num_threads()
    finally:
        lab.close()
    d, f = len(decoded) / decode_s, len(decoded) / forward_s
    return {"images": len(decoded), "wall_s": decode_s + forward_s, "decode_img_s": d, "forward_img_s": f,
            "limit_img_s": 1 / (1 / d + 1 / f), "threads": threads}


def decode_batch(batch: dict) -> dict:
    """JPEG bytes -> normalised 224x224 CHW float32 (resize the short side to 256, centre crop)."""
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
    """Ray Data actor: the TorchScript teacher, top-10 log-probabilities and the tail's log-sum-exp; decodes the
    JPEGs itself when `decode` (no tasks, no object-store copy of float images)."""

    def __init__(self, path: str, threads: int, decode: bool) -> None:
        torch.set_num_threads(threads)
        self.model = torch.jit.load(path).eval()
        self.decode = decode

    def __call__(self, batch: dict) -> dict:
        if self.decode:
            batch = decode_batch(batch)
        with torch.inference_mode():
            logp = torch.log_softmax(self.model(torch.from_numpy(np.ascontiguousarray(batch["image"]))), -1)
        top, ids = logp.topk(TOPK, -1)
        rest = logp.scatter(-1, ids, float("-inf"))
        return {"__key__": batch["__key__"], "topk_ids": ids.numpy().astype(np.int16),
                "topk_logits": top.numpy().astype(np.float16), "tail_lse": torch.logsumexp(rest, -1).numpy()}


def raydata_pass(variant: str, shards: list[Path], teacher: Path, out: Path) -> dict:
    import ray

    from distill.core.ray_cluster import connect_ray

    fused, actors, cpus, threads = RD_VARIANTS[variant]
    t0 = time.perf_counter()
    connect_ray(None)
    ray_start = time.perf_counter() - t0
    ds = ray.data.read_webdataset([str(s) for s in shards], decoder=None)
    if not fused:
        ds = ds.map_batches(decode_batch, batch_size=BATCH)
    ds = ds.map_batches(_Teacher, fn_constructor_args=(str(teacher), threads, fused), batch_size=BATCH,
                        concurrency=actors, num_cpus=cpus)
    ds.write_parquet(str(out))
    wall = time.perf_counter() - t0
    images = sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))
    ray.shutdown()
    return {"images": images, "wall_s": wall, "ray_start_s": ray_start}


def run_one(name: str, overrides: list[str], shards: list[Path], teacher: Path, work: Path, r: int) -> dict:
    out = work / f"{name}-{r}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache (or Ray Data output) every run: nothing is skipped
    if name in RD_VARIANTS:
        return raydata_pass(name, shards, teacher, out)
    if name == "limit":
        return limit_run(shards, teacher, out)
    return our_pass(shards, teacher, out, overrides)


def busy_loop(cpu: int) -> subprocess.Popen:
    """A CPU-bound loop pinned on one core: the process sharing the node."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def child(name: str, r: int, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--images", str(args.images), "--shards", str(args.shards), "--work", str(work),
           "--child", name, str(r)] + [f"--layout={t}" for t in args.layout]
    for attempt in range(2):  # a loaded machine can time Ray's start out ("node timed out during startup")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(
            Path(__file__).resolve().parents[1])})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode == 0 and line is not None:
            break
        print(f"{name} (repeat {r}, attempt {attempt}) failed:\n{proc.stderr[-1500:]}", flush=True)
    else:
        sys.exit(f"{name} (repeat {r}) failed twice")
    res = json.loads(line[7:])
    res["img_s"] = res["images"] / res["wall_s"]
    if "label_s" in res and res["label_s"] > 0:
        res["label_img_s"] = res["images"] / res["label_s"]
    res["load1"], res["attempts"] = os.getloadavg()[0], attempt + 1
    return res


def phase(names: list[str], args: argparse.Namespace, work: Path, tag: str) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternated: no pipeline always first or last
            res = child(name, r, args, work)
            results[name].append(res)
            extra = f", limit {res['limit_img_s']:.1f}" if "limit_img_s" in res else ""
            extra += f", Ray's start {res['ray_start_s']:.1f} s" if res.get("ray_start_s", 0) > 0.01 else ""
            extra += f", in the labeller {res['label_s']:.1f} s" if "label_s" in res else ""
            extra += f", {res['on_driver']} shard(s) on the driver" if res.get("on_driver") else ""
            print(f"[{tag}] {name:>10} repeat {r}: {res['images']} images, {res['wall_s']:.1f} s, "
                  f"{res['img_s']:.1f} img/s{extra}, load {res['load1']:.1f}", flush=True)
    return results


def med(xs: list[float]) -> float:
    return float(np.median(xs))


def report(results: dict[str, list[dict]], tag: str, peer: str | None) -> dict[str, float]:
    print(f"\n{tag}: median [min-max] of {len(next(iter(results.values())))} runs, load "
          f"{min(x['load1'] for rs in results.values() for x in rs):.1f}-"
          f"{max(x['load1'] for rs in results.values() for x in rs):.1f}")
    print("| pipeline | img/s, whole pass (Ray's start in) | Ray's start s | labelling img/s | shards on the driver "
          "| / peer |")
    print("|---|---:|---:|---:|---:|---:|")
    meds = {name: med([x["img_s"] for x in rs]) for name, rs in results.items() if name != "limit"}
    for name, rs in results.items():
        if name == "limit":
            continue
        v = [x["img_s"] for x in rs]
        start = f"{med([x['ray_start_s'] for x in rs]):.1f}" if rs[0].get("ray_start_s", 0) > 0.01 else "-"
        lab = f"{med([x['label_img_s'] for x in rs]):.1f}" if "label_img_s" in rs[0] else "-"
        ratio = f"{meds[name] / meds[peer]:.2f}x" if peer in meds else "-"
        driver = "/".join(str(x["on_driver"]) for x in rs) if "on_driver" in rs[0] else "-"
        print(f"| {name} | {meds[name]:.1f} [{min(v):.1f}-{max(v):.1f}] | {start} | {lab} | {driver} | {ratio} |")
    if "limit" in results:
        rs = results["limit"]
        lim = med([x["limit_img_s"] for x in rs])
        print(f"shared-core limit: decode {med([x['decode_img_s'] for x in rs]):.1f} img/s, forward "
              f"{med([x['forward_img_s'] for x in rs]):.1f} img/s ({rs[0]['threads']} torch threads) -> limit "
              f"{lim:.1f} [{min(x['limit_img_s'] for x in rs):.1f}-{max(x['limit_img_s'] for x in rs):.1f}]")
        for name in ("noray", "ray", "ray_plain"):
            if name in results:
                lab = med([x["label_img_s"] for x in results[name]])
                print(f"{name}: labelling {lab:.1f} img/s = {lab / lim:.2f} of the limit (goal >= 0.8)")
    return meds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contention", action="store_true", help="measure again beside a busy loop on one core")
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
    pipelines: dict[str, list[str]] = {"ray": ["ray.enabled=true"], "noray": ["ray.enabled=false"], "limit": [],
                                       "ray_plain": ["ray.enabled=true", "ray.label_while_starting=false"]}
    pipelines.update({name: [] for name in RD_VARIANTS})
    pipelines.update(parse_layout(text) for text in args.layout)
    if args.only:
        pipelines = {k: v for k, v in pipelines.items() if k in args.only}

    if args.child:  # one pipeline run in a fresh process (no Ray or torch state carried between runs)
        name, r = args.child[0], int(args.child[1])
        print("RESULT " + json.dumps(run_one(name, pipelines[name], shards, teacher, work, r)), flush=True)
        return

    names = list(pipelines)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {args.images} JPEGs 500x375 in {args.shards} shards, "
          f"mobilenetv3_small_050 @ {PX}, V=1, top-{TOPK}, batch {BATCH}; load {os.getloadavg()}", flush=True)
    quiet = phase(names, args, work, "quiet")
    rd = {n: med([x["img_s"] for x in quiet[n]]) for n in quiet if n in RD_VARIANTS}
    peer = max(rd, key=lambda n: rd[n]) if rd else None
    print(f"peer (fastest Ray Data pipeline by median, quiet): {peer}")
    out: dict = {"quiet": quiet, "peer": peer}
    q = report(quiet, "quiet", peer)
    if args.out:  # written after each phase: a stopped run keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    if args.contention:
        cpu = max(os.sched_getaffinity(0))
        loop = busy_loop(cpu)
        try:
            contended = phase(names, args, work, f"busy loop on CPU {cpu}")
        finally:
            loop.kill()
            loop.wait()
        out["contended"] = contended
        c = report(contended, f"contended (busy loop pinned on CPU {cpu})", peer)
        if peer:
            print("\n| pipeline | / peer quiet | / peer contended | change |\n|---|---:|---:|---:|")
            for name in q:
                a, b = q[name] / q[peer], c[name] / c[peer]
                print(f"| {name} | {a:.2f}x | {b:.2f}x | {b / a - 1:+.0%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Post-training int8 against quantization-aware distillation (QAD) int8, in ONNX Runtime and LiteRT (issue 29).

    .venv/bin/python bench/qad.py [--config examples/demo.yaml] [--work runs/bench_qad] [--epochs 12]
        [--students timm:mobilenetv3_small_050 timm:mobilenetv2_050] [--size 32] [--qad-epochs 2] [--qad-lr 2e-4]
        [--out bench/out/qad.json] [--reduce-range]

The demo's MNIST digits, teacher and cache (built from --config when missing). Each student is trained from the
cache (mode soft, every train shard labelled, in-process, 1 rank) at --size px, then `distill compress` runs with
pruning off and QAD on: `int8` / `litert+int8` (post-training int8 of the student) and `qad+int8` /
`qad+litert+int8` (QAD int8: --qad-epochs on the same cache, no teacher loaded) come from the same fp32 student,
calibration views and deployed recipe. Scored here on the val and test digits together (500 images: one image is
0.2 pt): top-1, its drop against the fp32 model of the same runtime, and top-1 agreement with that fp32 model.
Goal: where post-training int8 loses >= 1 pt or agrees < 0.97, QAD int8 within 0.3 pt of fp32, agreeing >= 0.97.
Also scored: each QAD int8 model against its own float twin (`qad.onnx` / `qad.tflite`, the model it was quantized
from), and the ONNX models with ONNX Runtime's optimizations off ("onnx-qdq-as-written": the recipe's arithmetic
without this CPU's fused int8 kernels). `--score-only` re-scores a finished --work without training.
The machine's 1-minute load is recorded before and after each step; compress times every stage in alternating
rounds (its report rows carry the spread and the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np
import onnxruntime as ort
import yaml

from distill.cluster.config_loading import load_config
from distill.cluster.pipeline import PipelineConfig, run_pipeline
from distill.compress.config import CompressConfig
from distill.compress.litert_run import LiteRTModel
from distill.compress.onnx_export import session
from distill.compress.run import run as run_compress
from distill.compress.run import val_batches
from distill.images.shards import expand_shard_patterns
from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.job_plan import plan_job
from distill.student_train.run import run as run_train

ROOT = Path(__file__).resolve().parents[1]
FILES = {"onnxruntime": {"fp32": "baseline.onnx", "ptq": "int8.onnx", "qad_fp32": "qad.onnx",
                         "qad": "qad_int8.onnx"},
         "litert": {"fp32": "baseline.tflite", "ptq": "int8.tflite", "qad_fp32": "qad.tflite",
                    "qad": "qad_int8.tflite"},
         # the same ONNX files with ONNX Runtime's graph optimizations off: each QDQ node executed in float, i.e. the
         # quantization recipe itself, without the fused int8 kernels of this CPU
         "onnx-qdq-as-written": {"fp32": "baseline.onnx", "ptq": "int8.onnx", "qad_fp32": "qad.onnx",
                                 "qad": "qad_int8.onnx"}}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def ensure_demo_inputs(config: Path) -> PipelineConfig:
    """The demo's shards, teacher and cache (made here when missing)."""
    os.chdir(ROOT)
    cfg = load_config(PipelineConfig, config, [], "pipeline")
    if not Path(cfg.cache.cache_root).exists() or not Path(cfg.cache.teacher.checkpoint).exists():
        run_pipeline(cfg.model_copy(update={"train": None, "compress": None, "deploy": None}))
    return cfg


def train_students(cfg: PipelineConfig, work: Path, args: argparse.Namespace) -> Path:
    """Each student from the cache, every train shard labelled (mode soft), --epochs; finished ones are kept."""
    base = cfg.train.model_dump(mode="json")
    data = base["data"]
    data["train_shards"] = [str(p) for p in expand_shard_patterns(data["train_shards"] + data["unlabelled_shards"])]
    data["unlabelled_shards"] = []
    variants = [{"name": name_of(arch), "arch": arch, "input_size": args.size} for arch in args.students]
    base.update(run_dir=str(work / "students"), variants=variants, grid={}, twins=False, ray={"enabled": False},
                metrics_port=None, base={**base["base"], "arch_kwargs": {}, "epochs": args.epochs, "lr": args.lr,
                                         "num_workers": 1, "mode": "soft", "alpha": 0.5, "temperature": 2.0})
    run_train(TrainConfig.model_validate(base))
    return work / "students"


def name_of(arch: str) -> str:
    return arch.split(":")[-1].replace("_", "-")


def eval_batches(train_run: Path, student: str) -> list[dict]:
    """The val and test digits (view 0), as compress reads them."""
    train_cfg = TrainConfig.model_validate(yaml.safe_load((train_run / "train_config.resolved.yaml").read_text()))
    job = plan_job(train_cfg)
    v = VariantConfig.model_validate(yaml.safe_load((train_run / student / "variant.yaml").read_text()))
    return val_batches(replace(job, val=job.val + job.test), v, None)


def score(student_dir: Path, batches: list[dict]) -> dict:
    """Top-1 of every model file, its drop against the fp32 model of its runtime, and agreement with it."""
    x = np.concatenate([b["pixels"] for b in batches]).astype(np.float32)
    y = np.concatenate([b["label"] for b in batches])
    out: dict = {"images": len(x)}
    for runtime, files in FILES.items():
        preds = {}
        for kind, name in files.items():
            path = student_dir / name
            if not path.exists():
                continue
            if runtime == "litert":
                preds[kind] = LiteRTModel(path)(x).argmax(1)
            elif runtime == "onnx-qdq-as-written":
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                preds[kind] = sess.run(None, {"input": x})[0].argmax(1)
            else:
                sess = session(path)
                preds[kind] = sess.run(None, {"input": x})[0].argmax(1)
        if "fp32" not in preds:
            continue
        fp32 = preds["fp32"]
        out[runtime] = {kind: {"top1": float((p == y).mean()),
                               "drop_pt": 100 * float((fp32 == y).mean() - (p == y).mean()),
                               "agreement_with_fp32": float((p == fp32).mean())} for kind, p in preds.items()}
        if "qad" in preds and "qad_fp32" in preds:  # QAD int8 against the float model it was quantized from
            out[runtime]["qad"]["agreement_with_own_fp32"] = float((preds["qad"] == preds["qad_fp32"]).mean())
    return out


def goal(r: dict) -> dict:
    """Per runtime: does PTQ lose >= 1 pt or agree < 0.97, and is QAD then within 0.3 pt and agreeing >= 0.97?"""
    verdict = {}
    for runtime in FILES:
        if runtime not in r or "qad" not in r[runtime]:
            continue
        ptq, qad = r[runtime]["ptq"], r[runtime]["qad"]
        ptq_poor = ptq["drop_pt"] >= 1.0 or ptq["agreement_with_fp32"] < 0.97
        qad_ok = qad["drop_pt"] <= 0.3 and qad["agreement_with_fp32"] >= 0.97
        verdict[runtime] = {"ptq_poor": ptq_poor, "qad_meets": qad_ok,
                            "goal": ("met" if qad_ok else "not met") if ptq_poor else "PTQ already fine"}
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_qad")
    ap.add_argument("--students", nargs="+", default=["timm:mobilenetv3_small_050", "timm:mobilenetv2_050"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=8e-3)
    ap.add_argument("--qad-epochs", type=int, default=2)
    ap.add_argument("--qad-lr", type=float, default=2e-4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "qad.json")
    ap.add_argument("--score-only", action="store_true", help="re-score the models already in --work (no training)")
    ap.add_argument("--reduce-range", action="store_true", help="quantize.reduce_range: ONNX Runtime int8 weights on "
                    "7 bits (x86 CPUs without VNNI); compressed into --work/compressed-reduce-range")
    args = ap.parse_args()
    work = args.work.resolve()
    if args.score_only:
        rescore(work, args)
        return
    steps: dict = {}
    t0, l0 = time.perf_counter(), load()
    cfg = ensure_demo_inputs(args.config)
    steps["demo inputs"] = {"seconds": time.perf_counter() - t0, "load_before": l0, "load_after": load()}
    t0, l0 = time.perf_counter(), load()
    train_run = train_students(cfg, work, args)
    steps["train students"] = {"seconds": time.perf_counter() - t0, "load_before": l0, "load_after": load()}
    names = [name_of(a) for a in args.students]
    t0, l0 = time.perf_counter(), load()
    comp = run_compress(CompressConfig.model_validate({
        "train_run": str(train_run), "out_dir": str(work / compressed_dir(args)), "select": {"students": names},
        "prune": {"enabled": False}, "quantize": {"calib_samples": 256, "reduce_range": args.reduce_range},
        "qad": {"enabled": True, "epochs": args.qad_epochs, "lr": args.qad_lr},
        "latency": {"rounds": 5, "repeats_b1": 20, "repeats_b32": 5}}))
    steps["compress (PTQ + QAD)"] = {"seconds": time.perf_counter() - t0, "load_before": l0, "load_after": load()}
    results = {}
    for name in names:
        t0, l0 = time.perf_counter(), load()
        r = student_result(work, name, args)
        r.update(report=[row for row in comp.rows if row["student"] == name],
                 seconds=time.perf_counter() - t0, load_before=l0, load_after=load())
        results[name] = r
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
              "cpus": os.cpu_count(), "steps": steps, "students": results, "failures": comp.failures,
              "args": {k: str(val) for k, val in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(results))
    print(json.dumps({n: r["goal"] for n, r in results.items()}, indent=1))


def compressed_dir(args: argparse.Namespace) -> str:
    return "compressed-reduce-range" if args.reduce_range else "compressed"


def student_result(work: Path, name: str, args: argparse.Namespace) -> dict:
    """One student's scores, the goal's verdict, its qad.json entries and how it was trained."""
    out = work / compressed_dir(args) / name
    r = score(out, eval_batches(work / "students", name))
    r.update(goal=goal(r), qad_json=json.loads((out / "qad.json").read_text())["stages"],
             trained=json.loads((work / "students" / name / "arch.json").read_text()))
    return r


def rescore(work: Path, args: argparse.Namespace) -> None:
    """Score the files a finished run left in --work again, into --out's "students" (keeping its steps)."""
    os.chdir(ROOT)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {}
    for name in [name_of(a) for a in args.students]:
        r = student_result(work, name, args)
        r["load_after"] = load()
        results[name] = r
    previous.update(students=results, rescored=" ".join([Path(sys.executable).name, *sys.argv]))
    args.out.write_text(json.dumps(previous, indent=1))
    print(table(results))
    print(json.dumps({n: r["goal"] for n, r in results.items()}, indent=1))


def table(results: dict) -> str:
    lines = ["| student | runtime | fp32 top-1 | PTQ int8 top-1 (drop, agreement) | QAD int8 top-1 (drop, agreement) | "
             "QAD float twin (drop, agreement) | QAD int8 vs its float twin |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for runtime in FILES:
            if runtime not in r:
                continue
            m = r[runtime]

            def cell(kind: str, m: dict = m) -> str:
                if kind not in m:
                    return "-"
                return (f"{100 * m[kind]['top1']:.1f}% ({-m[kind]['drop_pt']:+.1f} pt, "
                        f"{m[kind]['agreement_with_fp32']:.3f})")
            own = m.get("qad", {}).get("agreement_with_own_fp32")
            lines.append(f"| {name} | {runtime} | {100 * m['fp32']['top1']:.1f}% | {cell('ptq')} | {cell('qad')} | "
                         f"{cell('qad_fp32')} | {'-' if own is None else f'{own:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""LiteRT int8 against its parent and against ONNX Runtime int8, on one core, from a `distill compress` output.

    .venv/bin/python bench/litert.py [--compress-dir runs/demo/compressed] [--student NAME] [--repeats 300]
        [--rounds 5] [--out bench/out/litert.json]

Goal (issue 24): the LiteRT int8 student within the 1-pt floor of its parent (val top-1 from report.json, measured
by compress in the LiteRT interpreter), >= 3.5x smaller than the fp32 .tflite, and no slower at batch 1 than ONNX
Runtime int8 on the same core. Both runtimes get one thread and this process is pinned to one CPU; the two are
timed in alternating rounds (median of `repeats` calls per round, median over rounds) so a noisy neighbour slows
both alike. Input conversion (NCHW -> NHWC, int8 quantization of the input) is inside the LiteRT timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from compress.litert_run import LiteRTModel
from compress.onnx_export import session


def _median_call(fn, x: np.ndarray, repeats: int) -> float:
    for _ in range(20):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compress-dir", default="runs/demo/compressed")
    ap.add_argument("--student", default=None)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/out/litert.json")
    args = ap.parse_args()
    root = Path(args.compress_dir)
    rows = json.loads((root / "report.json").read_text())
    student = args.student or next(r["student"] for r in rows if r["stage"] == "baseline")
    mine = {r["stage"]: r for r in rows if r["student"] == student}
    src = root / student
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    ort_int8 = session(src / "int8.onnx", threads=1)
    lite_int8 = LiteRTModel(src / "int8.tflite", threads=1)
    x = np.load(src / "val_images.npy")[:1].astype(np.float32)
    ort_ms, lite_ms = [], []
    for _ in range(args.rounds):
        ort_ms.append(1e3 * _median_call(lambda a: ort_int8.run(None, {"input": a})[0], x, args.repeats))
        lite_ms.append(1e3 * _median_call(lite_int8, x, args.repeats))
    parent, l8, l32 = mine["baseline"], mine["litert+int8"], mine["litert"]
    result = {
        "student": student, "cpu": "one core (sched_setaffinity), 1 thread each",
        "parent_val_top1": parent["val_top1"], "litert_int8_val_top1": l8["val_top1"],
        "litert_fp32_val_top1": l32["val_top1"], "onnx_int8_val_top1": mine["int8"]["val_top1"],
        "drop_pt": 100 * (parent["val_top1"] - l8["val_top1"]),
        "litert_fp32_bytes": (src / "baseline.tflite").stat().st_size,
        "litert_int8_bytes": (src / "int8.tflite").stat().st_size,
        "onnx_int8_bytes": (src / "int8.onnx").stat().st_size,
        "x_smaller_than_fp32": (src / "baseline.tflite").stat().st_size / (src / "int8.tflite").stat().st_size,
        "onnx_int8_b1_ms": statistics.median(ort_ms), "litert_int8_b1_ms": statistics.median(lite_ms),
        "rounds_ms": {"onnxruntime_int8": ort_ms, "litert_int8": lite_ms}}
    result["litert_vs_onnx_b1"] = result["onnx_int8_b1_ms"] / result["litert_int8_b1_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

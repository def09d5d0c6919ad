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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from distill.compress.litert_run import LiteRTModel
from distill.compress.measure import median_latency
from distill.compress.onnx_export import session


def _median_call(fn, x: np.ndarray, repeats: int) -> float:
    return median_latency(fn, x, repeats, warmup=20)


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
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    x = np.load(root / student / "val_images.npy")[:1].astype(np.float32)
    parent = mine["baseline"]
    result = {"student": student, "cpu": "one core (sched_setaffinity), 1 thread each",
              "parent_val_top1": parent["val_top1"], "pairs": {}}
    # (LiteRT int8 stage, its fp32 .tflite stage, the ONNX Runtime int8 stage of the same model)
    for lite8, lite32, ort8 in (("litert+int8", "litert", "int8"), ("pruned+litert+int8", "pruned+litert",
                                                                     "pruned+int8")):
        if lite8 not in mine:
            continue
        ort = session(Path(mine[ort8]["file"]), threads=1)
        lite = LiteRTModel(Path(mine[lite8]["file"]), threads=1)
        ort_ms, lite_ms = [], []
        for _ in range(args.rounds):  # alternating rounds: a noisy neighbour slows both alike
            ort_ms.append(1e3 * _median_call(lambda a, s=ort: s.run(None, {"input": a})[0], x, args.repeats))
            lite_ms.append(1e3 * _median_call(lite, x, args.repeats))
        size = {k: Path(mine[k]["file"]).stat().st_size for k in (lite8, lite32, ort8)}
        result["pairs"][lite8] = {
            "val_top1": mine[lite8]["val_top1"], "drop_pt": 100 * (parent["val_top1"] - mine[lite8]["val_top1"]),
            "fp32_tflite_val_top1": mine[lite32]["val_top1"], "onnx_int8_val_top1": mine[ort8]["val_top1"],
            "bytes": size, "x_smaller_than_fp32_tflite": size[lite32] / size[lite8],
            "onnx_int8_b1_ms": statistics.median(ort_ms), "litert_int8_b1_ms": statistics.median(lite_ms),
            "onnx_over_litert_b1": statistics.median(ort_ms) / statistics.median(lite_ms),
            "rounds_ms": {"onnxruntime_int8": ort_ms, "litert_int8": lite_ms}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

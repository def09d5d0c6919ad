"""Measure a model the way it will be served: accuracy on the val split, file size, latency (ONNX Runtime here;
the LiteRT interpreter in compress/litert_run.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distill.compress.onnx_export import session


def onnx_accuracy(path: Path, batches: list[dict[str, np.ndarray]], threads: int | None = None) -> dict[str, float]:
    """batches: dicts with `pixels` (N,C,H,W float32), `label` (-1 = none), `teacher_top1` (view 0)."""
    sess = session(path, threads)
    return accuracy(lambda x: sess.run(None, {"input": x})[0], batches)


def accuracy(model: Callable[[np.ndarray], np.ndarray], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Val top-1/top-5 and teacher agreement of `model` (NCHW float32 batch -> logits) on `batches`."""
    n = labelled = top1 = top5 = agree = 0
    for b in batches:
        logits = model(b["pixels"].astype(np.float32))
        order = np.argsort(-logits, axis=1)[:, :5]
        has = b["label"] >= 0
        labelled += int(has.sum())
        top1 += int((order[has, 0] == b["label"][has]).sum())
        top5 += int((order[has] == b["label"][has, None]).any(1).sum())
        agree += int((order[:, 0] == b["teacher_top1"]).sum())
        n += len(logits)
    return {"val_top1": top1 / labelled if labelled else float("nan"),
            "val_top5": top5 / labelled if labelled else float("nan"),
            "teacher_agreement": agree / n if n else float("nan"), "val_samples": n}


def median_latency(model: Callable[[np.ndarray], object], x: np.ndarray, repeats: int, warmup: int) -> float:
    """Median seconds per call of `model(x)` (warm-up calls excluded): the one latency rule of every report."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_input(batch: int, channels: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)


def onnx_latency(path: Path, channels: int, size: int, batch: int, repeats: int, warmup: int,
                 threads: int | None = None) -> float:
    """Median seconds per call at this batch size (warm-up excluded)."""
    sess = session(path, threads)
    return median_latency(lambda a: sess.run(None, {"input": a}), random_input(batch, channels, size), repeats,
                          warmup)


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6

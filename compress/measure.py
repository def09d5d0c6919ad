"""Measure a model the way it will be served: accuracy on the val split, file size, latency (ONNX Runtime here;
the LiteRT interpreter in compress/litert_run.py)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Spread:
    """A model's median call time in each timing round (seconds): the median of them and their range."""

    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def low(self) -> float:
        return min(self.rounds)

    @property
    def high(self) -> float:
        return max(self.rounds)


def timed_rounds(models: dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int) -> dict[str, Spread]:
    """Every model timed in `rounds` rounds of `calls` calls (the median call of each round kept), the order
    alternating (A B C, C B A, A B C, ...): a machine that speeds up or slows down during the measurement (another
    job starting, a frequency change) then falls on every model alike instead of on whichever ran last."""
    for fn in models.values():
        for _ in range(warmup):
            fn()
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            calls_s = []
            for _ in range(calls):
                t0 = time.perf_counter()
                models[name]()
                calls_s.append(time.perf_counter() - t0)
            times[name].append(statistics.median(calls_s))
    return {n: Spread(tuple(t)) for n, t in times.items()}


def speedup(base: Spread, other: Spread) -> tuple[float, str]:
    """(median ratio base/other, verdict). "faster" or "slower" only when the two ranges of round medians do not
    overlap: a difference inside the spread of repeated rounds is no measured speed-up, whatever the ratio says."""
    ratio = base.median / other.median
    if other.high < base.low:
        return ratio, "faster"
    if other.low > base.high:
        return ratio, "slower"
    return ratio, "within spread"


def machine_load() -> dict[str, float]:
    """The 1-minute load average and the CPUs this process may use: how busy the machine was while timing."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"load_1m": round(os.getloadavg()[0], 2), "cpus": cpus}


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6

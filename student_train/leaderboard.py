"""The leaderboard of a training run: one row per variant, from the files each variant wrote."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from student_train.config import VariantConfig
from student_train.status import read_status
from teacher_cache.models import count_params, create_model

COLUMNS = ["variant", "status", "arch", "mode", "alpha", "temperature", "epochs", "val_top1", "val_top5",
           "val_teacher_agreement", "params", "macs", "samples_per_s", "wall_seconds", "reason"]


def model_cost(arch: str, arch_kwargs: dict, num_classes: int, in_chans: int, size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of an untrained instance."""
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans, **arch_kwargs).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, in_chans, size, size))
    return count_params(model), int(fc.get_total_flops() // 2)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def variant_row(run_dir: Path, name: str, v: VariantConfig, num_classes: int, in_chans: int, size: int) -> dict:
    out = Path(run_dir) / name
    status = read_status(run_dir, name) or {"status": "not run"}  # a damaged file is reported, not a crash
    rows = read_metrics(out / "metrics.csv")
    best = max(rows, key=lambda r: (r.get("val_top1") or -1, r.get("val_teacher_agreement") or -1), default={})
    params, macs = model_cost(v.arch, v.arch_kwargs, num_classes, in_chans, size)
    return {"variant": name, "status": status["status"], "arch": v.arch, "mode": v.mode, "alpha": v.alpha,
            "temperature": v.temperature, "epochs": len(rows), "val_top1": best.get("val_top1"),
            "val_top5": best.get("val_top5"), "val_teacher_agreement": best.get("val_teacher_agreement"),
            "params": params, "macs": macs,
            "samples_per_s": (sum(r["samples_per_s"] for r in rows) / len(rows)) if rows else None,
            "wall_seconds": rows[-1].get("wall_seconds") if rows else None, "reason": status.get("reason", "")}


def write_leaderboard(run_dir: Path, rows: list[dict]) -> Path:
    rows = sorted(rows, key=lambda r: (r["status"] != "done", -(r["val_top1"] or -1)))
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("variant", pa.string()), ("status", pa.string()), ("arch", pa.string()), ("mode", pa.string()),
        ("alpha", pa.float64()), ("temperature", pa.float64()), ("epochs", pa.int64()), ("val_top1", pa.float64()),
        ("val_top5", pa.float64()), ("val_teacher_agreement", pa.float64()), ("params", pa.int64()),
        ("macs", pa.int64()), ("samples_per_s", pa.float64()), ("wall_seconds", pa.float64()),
        ("reason", pa.string())]))
    path = Path(run_dir) / "leaderboard.parquet"
    pq.write_table(table, path)
    return path


def format_leaderboard(rows: list[dict]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = f"{'variant':40s} {'status':8s} {'mode':6s} {'a':>4s} {'T':>4s} {'top1':>6s} {'top5':>6s} " \
           f"{'agree':>6s} {'params':>8s} {'MMACs':>7s} {'samp/s':>7s} {'wall s':>7s}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["status"] != "done", -(r["val_top1"] or -1))):
        lines.append(f"{r['variant'][:40]:40s} {r['status'][:8]:8s} {r['mode']:6s} {r['alpha']:4.2f} "
                     f"{r['temperature']:4.1f} {f(r['val_top1'], '6.4f'):>6s} {f(r['val_top5'], '6.4f'):>6s} "
                     f"{f(r['val_teacher_agreement'], '6.4f'):>6s} {r['params']:8d} {r['macs'] / 1e6:7.2f} "
                     f"{f(r['samples_per_s'], '7.1f'):>7s} {f(r['wall_seconds'], '7.1f'):>7s}")
        if r["reason"]:
            lines.append(f"    reason: {r['reason']}")
    return "\n".join(lines)

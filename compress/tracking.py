"""A compress run in MLflow (core/tracking.py): a parent run per `distill compress`, a child run per student and
stage (accuracy, size, latency, agreement with its parent), the Pareto plot and the report as artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.compress.config import CompressConfig
from distill.core.tracking import Tracker

_NUMBERS = ("val_top1", "val_top5", "size_mb", "latency_b1_ms", "latency_b32_ms", "macs", "params",
            "agreement_with_parent", "int8_agreement")


def record_compress(cfg: CompressConfig, rows: list[dict[str, Any]], files: list[Path]) -> None:
    """Never fails compress (core/tracking.py)."""
    if not cfg.tracking.enabled:
        return
    out = Path(cfg.out_dir)
    parent = Tracker.start(cfg.tracking, out, f"compress {out.name}", tags={"distill.stage": "compress"},
                           params={"train_run": str(cfg.train_run), "prune": cfg.prune.model_dump(mode="json"),
                                   "quantize": cfg.quantize.model_dump(mode="json"),
                                   "litert": cfg.litert.model_dump(mode="json")})
    for row in rows:
        child = Tracker.start(cfg.tracking, out, f"{row['student']} {row['stage']}", parent=parent,
                              params={"student": row["student"], "stage": row["stage"],
                                      "runtime": row.get("runtime", "onnxruntime")},
                              tags={"distill.stage": "compress", "distill.student": row["student"]})
        child.log_metrics({k: row[k] for k in _NUMBERS if k in row})
        child.end()
    for f in files:
        parent.log_artifact(f)
    parent.end()

"""Pick the students worth compressing from a training run's leaderboard."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def pareto_front(rows: list[dict], cost: str = "macs") -> list[dict]:
    """Rows not dominated in (higher val_top1, lower cost), best accuracy first."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["val_top1"] >= r["val_top1"] and o[cost] <= r[cost]
                        and (o["val_top1"] > r["val_top1"] or o[cost] < r[cost]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r["val_top1"])


def select_students(train_run: Path, top_n: int, by: str) -> list[dict]:
    path = Path(train_run) / "leaderboard.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: `train_run` must be the run_dir of a finished `distill train`")
    rows = [r for r in pq.read_table(path).to_pylist()
            if r["status"] in ("done", "stopped") and r["val_top1"] is not None
            and (Path(train_run) / r["variant"] / "best.pt").exists()]
    if not rows:
        raise ValueError(f"{path}: no finished variant with a val top-1 and a best.pt to compress")
    ranked = pareto_front(rows) if by == "pareto" else sorted(rows, key=lambda r: -r["val_top1"])
    return ranked[:top_n]

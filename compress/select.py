"""Pick the students worth compressing from a training run's leaderboard."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from distill.core.errors import InputError


def pareto_front(rows: list[dict], cost: str = "macs") -> list[dict]:
    """Rows not dominated in (higher val_top1, lower cost), best accuracy first."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["val_top1"] >= r["val_top1"] and o[cost] <= r[cost]
                        and (o["val_top1"] > r["val_top1"] or o[cost] < r[cost]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r["val_top1"])


def select_students(train_run: Path, top_n: int, by: str, names: list[str] | None = None) -> list[dict]:
    """The leaderboard rows to compress: `names` in that order, else the top_n by val top-1 or the Pareto front.
    Failed variants are never picked (a partial run's leaderboard lists them with their reason)."""
    path = Path(train_run) / "leaderboard.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: `train_run` must be the run_dir of a finished `distill train`")
    board = pq.read_table(path).to_pylist()
    rows = [r for r in board if r["status"] in ("done", "stopped") and r["val_top1"] is not None
            and (Path(train_run) / r["variant"] / "best.pt").exists()]
    if names:
        return [_named(name, board, rows, path) for name in dict.fromkeys(names)]
    if not rows:
        raise ValueError(f"{path}: no finished variant with a val top-1 and a best.pt to compress")
    ranked = pareto_front(rows) if by == "pareto" else sorted(rows, key=lambda r: -r["val_top1"])
    return ranked[:top_n]


def _named(name: str, board: list[dict], ready: list[dict], path: Path) -> dict:
    row = next((r for r in ready if r["variant"] == name), None)
    if row is not None:
        return row
    choices = ", ".join(r["variant"] for r in ready) or "none"
    listed = next((r for r in board if r["variant"] == name), None)
    if listed is None:
        raise InputError(f"select.students: no variant '{name}' in {path}; students that can be compressed: {choices}")
    why = f"its status is {listed['status']}" + (f" ({listed['reason']})" if listed.get("reason") else "")
    raise InputError(f"select.students: '{name}' cannot be compressed: {why}, or it has no val top-1 / best.pt; "
                     f"students that can be compressed: {choices}")

"""A sweep in MLflow (core/tracking.py): one parent run per `distill train`, one child run per student and per twin.

The driver makes the runs before any worker starts and keeps each run's reference beside its outputs
(`<run_dir>/.mlflow_run.json`, `<run_dir>/<student>/.mlflow_run.json`): a worker on any node logs its student's
epochs to that run, and a sweep re-run after a kill continues the same runs instead of starting new ones. At the end
the driver adds the leaderboard's numbers (best val top-1, Δ against the twin), the curves and the resolved configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.core.tracking import RunRef, Tracker, TrackingConfig
from distill.student_train.variant import VariantConfig

RUN_FILE = ".mlflow_run.json"
_WORKER_RUNS: dict[Path, Tracker] = {}  # this process's trackers, by student directory


def start_sweep(tracking: TrackingConfig, run_dir: Path, variants: list[tuple[str, VariantConfig]],
                twins: dict[str, str], groups: dict[str, str], fingerprint: str | None) -> Tracker:
    """The sweep's run and a child run per student (made, or found again after a kill)."""
    twin_of = {t: s for s, t in twins.items()}
    parent = Tracker.start(tracking, run_dir, f"train {run_dir.name}", resume=run_dir / RUN_FILE,
                           params={"run_dir": str(run_dir), "students": len(variants)},
                           tags={"distill.stage": "train", "distill.cache_fingerprint": fingerprint or "none"})
    for name, v in variants:
        role = "twin" if name in twin_of else ("distilled" if name in twins else "student")
        tags = {"distill.stage": "train", "distill.role": role, "distill.group": groups.get(name, ""),
                "distill.cache_fingerprint": fingerprint or "none"}
        if name in twins:
            tags["distill.twin"] = twins[name]
        if name in twin_of:
            tags["distill.twin_of"] = twin_of[name]
        params = {**v.model_dump(mode="json"), "group": groups.get(name, ""), "loss": v.make_loss().describe()}
        Tracker.start(tracking, run_dir, name, parent=parent, params=params, tags=tags,
                      resume=run_dir / name / RUN_FILE)
    return parent


def log_epoch(student_dir: Path, row: dict[str, Any]) -> None:
    """One epoch's metrics row (loss parts, val top-1, teacher agreement, samples/s, ...) on the student's run."""
    key = Path(student_dir)
    if key not in _WORKER_RUNS:
        _WORKER_RUNS[key] = Tracker.attach(RunRef.load(key / RUN_FILE))
    _WORKER_RUNS[key].log_metrics(row, step=int(row["epoch"]))


def finish_sweep(parent: Tracker, run_dir: Path, rows: list[dict[str, Any]], files: list[Path]) -> None:
    """Each student's final numbers and status, then the sweep's artifacts; the runs end."""
    for row in rows:
        child = Tracker.attach(RunRef.load(run_dir / row["variant"] / RUN_FILE))
        # the leaderboard's numbers under their own names (the per-epoch series keep theirs)
        child.log_metrics({"best_val_top1": row.get("val_top1"), "best_val_top5": row.get("val_top5"),
                           "test_top1": row.get("test_top1"), "delta_top1_vs_twin": row.get("delta_top1_vs_twin"),
                           "params": row.get("params"), "macs": row.get("macs"),
                           "mean_samples_per_s": row.get("samples_per_s")})
        child.set_tags({"distill.status": row["status"]})
        child.log_artifact(run_dir / row["variant"] / "variant.yaml")
        child.log_artifact(run_dir / row["variant"] / "metrics.csv")
        child.end({"done": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}.get(row["status"], "KILLED"))
    for f in files:
        parent.log_artifact(f)
    parent.end("FINISHED" if rows and all(r["status"] == "done" for r in rows) else "FAILED")

"""ASHA early stopping per student (Li et al., "A System for Massively Parallel Hyperparameter Tuning").

Ray Tune's ASHAScheduler stops trials; a trial is now a group of students, and one weak student must leave its group
without stopping the others. So the rule runs here, per student, with Ray Tune's semantics (one bracket): rungs at
grace * rf^k epochs below max_t; a student reaching a rung is stopped if its val top-1 is below the
(1 - 1/rf) quantile of the values recorded at that rung before it, and its value is recorded either way. The rung
records of a run live in `<run_dir>/asha.json` (read and replaced under a lock file), so students of every group of
the run are compared with each other, as Tune compared its trials. `distill train` clears them when a run starts.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.atomic_io import atomic_write
from distill.student_train.job import AshaRule

RECORDS = "asha.json"


def milestones(rule: AshaRule) -> list[int]:
    """Rung epochs, highest first (Tune: min_t * rf^k for k < int(log(max_t / min_t) / log(rf) + 1))."""
    rungs = int(math.log(rule.max_t / rule.grace_period) / math.log(rule.reduction_factor) + 1)
    return [int(rule.grace_period * rule.reduction_factor ** k) for k in reversed(range(max(0, rungs)))]


@contextmanager
def _locked(run_dir: Path) -> Iterator[dict[str, dict[str, float]]]:
    """The rung records (epoch -> {student: val top-1}), held under an exclusive lock and written back atomically."""
    lock = Path(run_dir) / f".{RECORDS}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        path = Path(run_dir) / RECORDS
        records = json.loads(path.read_text()) if path.exists() else {}
        yield records
        atomic_write(path, json.dumps(records, indent=1))


def decide(records: dict[str, dict[str, float]], rule: AshaRule, name: str, epoch: int,
           score: float | None) -> str | None:
    """Tune's _Bracket.on_result for one student: the reason to stop it now, or None. Updates `records`."""
    if score is None:
        return None
    for milestone in milestones(rule):
        recorded = records.setdefault(str(milestone), {})
        if epoch < milestone or name in recorded:
            continue
        cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / rule.reduction_factor) * 100) if recorded else None
        recorded[name] = score
        if cutoff is not None and score < cutoff:
            return (f"stopped early by ASHA after {epoch} epoch(s): val top-1 {score:.4f} below the rung's cutoff "
                    f"{float(cutoff):.4f}")
        return None
    return None


def asha_decisions(run_dir: Path, rule: AshaRule, results: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """For each (student, its epoch row) just finished: student -> why it stops (absent: it goes on)."""
    out = {}
    with _locked(run_dir) as records:
        for name, row in results:
            if int(row["epoch"]) >= rule.max_t:
                continue  # its last epoch: nothing left to stop
            reason = decide(records, rule, name, int(row["epoch"]), row.get("val_top1"))
            if reason:
                out[name] = reason
    return out


def clear(run_dir: Path) -> None:
    """A new run starts its rungs empty (Tune's scheduler state lived as long as one sweep)."""
    (Path(run_dir) / RECORDS).unlink(missing_ok=True)

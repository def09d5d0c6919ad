"""A variant's status file (<run_dir>/<variant>/status.json).

States: running, done, failed (with the reason), stopped (ASHA stopped it early: final), interrupted (its
trial ended without finishing, e.g. a worker died, or the job was stopped with SIGTERM: resumed by the next run).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from distill.core.atomic_io import atomic_write

log = logging.getLogger(__name__)

FINAL = ("done", "stopped")
STOP_MARKER = ".stop_requested"  # in the run dir while a stopped job winds down: trials dying now are not failures


def write_status(run_dir: Path, name: str, status: str, reason: str = "", **extra: object) -> None:
    """Replace the status; the student's group id (`group`) is kept from the last status unless given."""
    out = Path(run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    if "group" not in extra and (group := read_status(run_dir, name).get("group")):
        extra["group"] = group
    atomic_write(out / "status.json",
                 json.dumps({"status": status, "reason": reason, "time": time.time(), **extra}))


def read_status(run_dir: Path, name: str) -> dict:
    """The status dict; {} when there is none. A damaged file (e.g. left empty by a full disk) is reported and
    treated as "not finished", so the variant is trained (or resumed) again instead of wedging every run."""
    path = Path(run_dir) / name / "status.json"
    if not path.exists():
        return {}
    try:
        status = json.loads(path.read_text())
        if not isinstance(status, dict) or not isinstance(status.get("status"), str):
            raise ValueError("no 'status' field")
        return status
    except (ValueError, OSError) as exc:
        log.warning("%s is damaged (%s); treating variant %s as not finished, it will be trained or resumed "
                    "again", path, exc, name)
        return {"status": "unknown", "reason": f"status.json damaged: {exc}"}


def finished(run_dir: Path, name: str) -> bool:
    return read_status(run_dir, name).get("status") in FINAL


def epochs_logged(run_dir: Path, name: str) -> int:
    """The highest epoch in the variant's metrics.csv (0 when none): what a trial really completed."""
    path = Path(run_dir) / name / "metrics.csv"
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return max((int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch")), default=0)


def settle_trials(run_dir: Path, variants: list[tuple[str, int]], errors: dict[str, str]) -> None:
    """After a sweep, for each (variant, epochs) whose status still says "running" (its trial never wrote an end):
    done if it logged every epoch (ASHA also ends a trial at max_t), else "interrupted" (its driver died, the
    sweep was cut short): not finished, the next run resumes it. Only the scheduler itself writes "stopped"."""
    for name, epochs in variants:
        if read_status(run_dir, name).get("status") not in ("running", "unknown"):
            continue
        done = epochs_logged(run_dir, name)
        if done >= epochs:
            write_status(run_dir, name, "done")
        else:
            reason = errors.get(name, "its trial ended before the variant finished")
            write_status(run_dir, name, "interrupted", f"{reason}; after {done} epoch(s), the next run resumes it")


def mark_stopped(run_dir: Path, variants: list[tuple[str, int]], why: str) -> None:
    """The job was asked to stop (SIGTERM): every variant still running becomes "interrupted" (or "done" if it
    logged every epoch), and trials that die while the job winds down must not call themselves failed."""
    note_stop(run_dir, why)
    settle_trials(run_dir, variants, {name: why for name, _ in variants})
    log.warning("%s: unfinished variants are marked interrupted; the next run resumes them", why)


def note_stop(run_dir: Path, why: str = "stopped by SIGTERM") -> None:
    (Path(run_dir) / STOP_MARKER).write_text(why)


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP_MARKER).exists()


def clear_stop(run_dir: Path) -> None:
    (Path(run_dir) / STOP_MARKER).unlink(missing_ok=True)

"""A variant's status file (<run_dir>/<variant>/status.json).

States: running, done, failed (with the reason), stopped (ASHA stopped it early: final), interrupted (its
trial ended without finishing, e.g. a worker died: resumed by the next run).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from student_train.atomic_io import atomic_write_text

log = logging.getLogger(__name__)

FINAL = ("done", "stopped")


def write_status(run_dir: Path, name: str, status: str, reason: str = "", **extra: object) -> None:
    out = Path(run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "status.json",
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

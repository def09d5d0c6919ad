"""A variant's status file (<run_dir>/<variant>/status.json): running, done, failed (with the reason), stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path


def write_status(run_dir: Path, name: str, status: str, reason: str = "", **extra: object) -> None:
    out = Path(run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "status.json").write_text(json.dumps({"status": status, "reason": reason, "time": time.time(), **extra}))


def read_status(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def finished(run_dir: Path, name: str) -> bool:
    return read_status(run_dir, name).get("status") in ("done", "stopped")

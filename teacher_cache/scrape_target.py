"""Publish a process's /metrics endpoint as a Prometheus file_sd target (used by every exporting stage)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from teacher_cache.manifest import atomic_write_bytes


def publish_target(path: Path, host: str, port: int, labels: dict[str, str]) -> None:
    """Atomically write `[{targets: [host:port], labels}]`; a wildcard bind names this node's address."""
    target_host = host if host not in ("0.0.0.0", "::") else socket.gethostbyname(socket.gethostname())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps([{"targets": [f"{target_host}:{port}"], "labels": labels}]).encode())

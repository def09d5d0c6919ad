"""Crash-safe small files: a reader sees the old content or the new one, never an empty or half-written file.

A plain `write_text` truncates first; a crash or a full disk then leaves an empty status.json / arch.json /
`latest`, and every later run trips over it. The cache's writer already does it right (temp file in the same
directory, fsync, rename over the target, fsync the directory): training state uses the same code.
"""

from __future__ import annotations

from pathlib import Path

from teacher_cache.manifest import atomic_write_bytes, fsync_dir

__all__ = ["atomic_write_text", "fsync_dir"]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably."""
    atomic_write_bytes(Path(path), text.encode())

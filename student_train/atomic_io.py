"""Crash-safe small files: a reader sees the old content or the new one, never an empty or half-written file.

A plain `write_text` truncates first; a crash or a full disk then leaves an empty status.json / arch.json /
`latest`, and every later run trips over it. Write a temp file in the same directory, fsync it, rename it over
the target, fsync the directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably (tmp + fsync + os.replace + fsync of the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

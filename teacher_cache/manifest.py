"""The manifest: which shard produced which cache file, from which input identity, with which checksum.

Written only by the driver (one writer), atomically (temp file + fsync + rename + directory fsync) after each
cache file is renamed into place. A reader accepts only files listed here whose checksum matches, so a file
left by a killed job is never read as complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.atomic_io import atomic_write
from core.object_store import CacheLockedError  # noqa: F401 - raised here, re-exported
from teacher_cache.schema import SCHEMA_VERSION
from teacher_cache.shards import ShardIdentity, ShardPath, file_sha256

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"


@dataclass
class ShardEntry:
    source: str  # absolute path of the input shard
    size: int
    mtime_ns: int
    content_sha256: str
    file: str  # cache file name inside the fingerprint directory
    file_bytes: int
    file_sha256: str
    rows: int
    errors: int
    written_at: float = field(default_factory=time.time)
    ctime_ns: int | None = None  # absent in manifests written before ctime/inode joined the identity
    inode: int | None = None
    etag: str | None = None  # input shards in object storage: the ETag their listing reported

    def identity(self) -> ShardIdentity:
        return ShardIdentity(self.size, self.mtime_ns, self.content_sha256, self.ctime_ns, self.inode, self.etag)

    def update_identity(self, ident: ShardIdentity, source: str) -> None:
        """Same content, moved cheap identity (touched, copied): remember the new one so we never hash it again."""
        self.size, self.mtime_ns, self.ctime_ns, self.inode = ident.size, ident.mtime_ns, ident.ctime_ns, ident.inode
        self.etag = ident.etag
        self.source = source


@dataclass
class Manifest:
    fingerprint: str
    teacher: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    shards: dict[str, ShardEntry] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path, fingerprint: str | None = None) -> Manifest | None:
        path = directory / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            shards = {k: ShardEntry(**v) for k, v in raw.get("shards", {}).items()}
            m = cls(fingerprint=raw["fingerprint"], teacher=raw.get("teacher", {}),
                    schema_version=int(raw["schema_version"]), shards=shards)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: damaged manifest ({exc}); delete the directory to rebuild the cache") from exc
        if fingerprint is not None and m.fingerprint != fingerprint:
            raise ValueError(f"{path}: manifest is for fingerprint {m.fingerprint}, expected {fingerprint}")
        return m

    def save(self, directory: Path) -> None:
        data = {"schema_version": self.schema_version, "fingerprint": self.fingerprint, "teacher": self.teacher,
                "shards": {k: asdict(v) for k, v in sorted(self.shards.items())}}
        atomic_write(directory / MANIFEST_NAME, json.dumps(data, indent=1).encode())


class DirectoryLock:
    """Exclusive flock on <dir>/.lock: never two writers on one cache. Released by the kernel if we die."""

    def __init__(self, directory: Path, wait: bool = False) -> None:
        self.path = directory / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheLockedError(f"{self.path.parent} is being written by another job ({holder}); wait for it "
                                   "to finish or stop it (a killed job releases the lock)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


PARQUET_MAGIC = b"PAR1"


def cache_file_problem(path: Path, expected_bytes: int) -> str | None:
    """Cheap check on every open (no checksum): the size the manifest recorded and an intact Parquet footer.

    Catches truncation and most partial copies at the cost of one stat and a 12-byte read; the checksum is
    taken once per file per run on top of this (see teacher_cache.reader).
    """
    try:
        size = path.stat().st_size
        if size != expected_bytes:
            return f"{size} bytes but the manifest says {expected_bytes} (truncated or replaced)"
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 8))
            tail = f.read(8)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    footer_len = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
    if head != PARQUET_MAGIC or tail[4:] != PARQUET_MAGIC or not 0 <= footer_len <= size - 12:
        return "no valid Parquet footer (partial or altered file)"
    return None


@dataclass
class RefreshPlan:
    """What a run must do: label these shards; skip those; report vanished ones; touched = same content."""

    todo: list[tuple[str, ShardPath, str]] = field(default_factory=list)  # (stem, path, reason: new|changed|...)
    unchanged: list[str] = field(default_factory=list)
    touched: dict[str, ShardIdentity] = field(default_factory=dict)  # cheap identity moved, content hash equal
    vanished: list[str] = field(default_factory=list)


def plan_refresh(manifest: Manifest | None, shards: dict[str, ShardPath], directory: Path,
                 verify_cache_files: bool = False,
                 cache_file_check: Callable[[ShardEntry], str | None] | None = None) -> RefreshPlan:
    """Decide per shard with the cheapest evidence first: size+mtime+ctime+inode (size+last-modified+ETag for an
    object), then the content hash if any moved. ``cache_file_check`` replaces the local check of each listed
    cache file (an object-store cache checks sizes from one listing)."""
    plan = RefreshPlan()
    listed = manifest.shards if manifest is not None else {}
    for stem, path in shards.items():
        entry = listed.get(stem)
        if entry is None:
            plan.todo.append((stem, path, "new"))
            continue
        cache_file = directory / entry.file
        if cache_file_check is not None:
            damaged = cache_file_check(entry) is not None
        else:
            damaged = cache_file_problem(cache_file, entry.file_bytes) is not None or (
                verify_cache_files and file_sha256(cache_file) != entry.file_sha256)
        if damaged:
            plan.todo.append((stem, path, "cache file missing or damaged"))
            continue
        ident = ShardIdentity.stat(path)
        if entry.source == str(path) and ident.same_cheap(entry.identity()):
            plan.unchanged.append(stem)
            continue
        content = file_sha256(path) if ident.size == entry.size else None
        if content is not None and content == entry.content_sha256:
            plan.unchanged.append(stem)
            plan.touched[stem] = replace(ident, sha256=content)
        else:
            plan.todo.append((stem, path, "changed"))
    plan.vanished = sorted(set(listed) - set(shards))
    return plan

"""A local directory (or a shared filesystem) behind the `Store` interface: rename, fsync, flock, held versions."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.core.atomic_io import Writer, atomic_write, file_sha256, fsync_dir, is_tmp, remove_stale_tmp
from distill.core.storage.base import (
    CacheLockedError,
    FileInfo,
    Journal,
    Lock,
    Published,
    Store,
    View,
    content_addressed,
)
from distill.core.storage.journal import decode_records, encode_record, split_generation, with_generation
from distill.core.storage.versions import collect, gc_lock, local_version

LOCK_NAME = ".lock"


class DirectoryLock(Lock):
    """Exclusive flock on <dir>/.lock: never two writers on one directory. Released by the kernel if we die."""

    def __init__(self, directory: Path, wait: bool = False, store: LocalStore | None = None) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.wait = wait
        self.store = store  # its writes are fenced by this lock while it is held (a flock is never lost)
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
        if self.store is not None:
            self.store._lock = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store._lock = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LocalJournal(Journal):
    """``<stem>.<generation>.journal`` beside the snapshot: one appended, fsynced line per record."""

    def __init__(self, store: LocalStore, name: str) -> None:
        self.store, self.name = store, name
        self.snapshot_path = store.path / name
        self.generation = 0
        self._pending = 0
        self._valid = 0  # bytes of intact records in the current journal file (a torn tail is cut before appending)
        self._fd: int | None = None
        self._loaded = False

    def path_for(self, generation: int) -> Path:
        return self.store.path / f"{Path(self.name).stem}.{generation}.journal"

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.snapshot_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        for _ in range(5):  # a compaction between reading the snapshot and its journal: read both again
            before = self._stat()
            try:
                raw = json.loads(self.snapshot_path.read_bytes()) if before is not None else None
            except FileNotFoundError:
                continue
            except ValueError as exc:
                raise ValueError(f"{self.snapshot_path}: not valid JSON ({exc})") from exc
            if raw is not None and not isinstance(raw, dict):
                raise ValueError(f"{self.snapshot_path}: not a JSON object")
            snapshot, generation = split_generation(raw)
            try:
                data = self.path_for(generation).read_bytes()
            except FileNotFoundError:
                data = b""
            if self._stat() == before:
                records, self._valid = decode_records(data)
                self.generation, self._pending, self._loaded = generation, len(records), True
                self.loaded_stamp = (before, generation, len(data))
                return snapshot, records
        raise OSError(f"{self.snapshot_path}: replaced on every read (another writer without the lock?)")

    def append(self, record: dict[str, Any]) -> None:
        self.store.fence()
        if not self._loaded:
            self.load()
        if self._fd is None:
            path = self.path_for(self.generation)
            created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.ftruncate(self._fd, self._valid)  # drop a torn record a crash left (it was never read as one)
            if created:
                fsync_dir(self.store.path)
        data = encode_record(record)
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            self._cut_back()
            raise
        self._valid += len(data)
        self._pending += 1

    def _cut_back(self) -> None:
        """After a failed or short write (a full disk): truncate to the last good record, so a record appended
        once space is freed is not hidden behind a torn one; the next append opens and truncates again."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._valid)
            os.close(fd)

    def compact(self, snapshot: dict[str, Any]) -> None:
        self.store.fence()
        if not self._loaded:
            self.load()
        old = self.generation
        atomic_write(self.snapshot_path, with_generation(snapshot, old + 1))
        self.close()
        for stale in self.store.path.glob(f"{Path(self.name).stem}.*.journal"):  # this one and any a crash left
            stale.unlink(missing_ok=True)
        fsync_dir(self.store.path)
        self.generation, self._pending, self._valid = old + 1, 0, 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def pending(self) -> int:
        return self._pending

    def stamp(self) -> tuple:
        """Equals `loaded_stamp` while nothing changed since `load` (two stats: the snapshot and its journal)."""
        try:
            size = self.path_for(self.generation).stat().st_size
        except FileNotFoundError:
            size = 0
        return (self._stat(), self.generation, size)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte or raise: `os.write` may write fewer bytes than asked (a full disk, a file size limit)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no byte written")
        view = view[n:]


class LocalStore(Store):
    """A directory on a local or shared filesystem."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.workdir = self.path
        self._lock: Lock | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "location": self.location, "workdir": self.workdir, "_lock": None}

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.path / name)

    def fence(self) -> None:
        if self._lock is not None:
            self._lock.fence()

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, name: str, data: bytes) -> None:
        self.fence()
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)

    def update(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (data := change(self.read(name))) is not None:
                atomic_write(target, data)
        finally:
            os.close(fd)

    def remove(self, names: list[str]) -> None:
        self.fence()
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def listing(self, suffix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.path) as entries:
            for e in entries:
                if e.name.endswith(suffix) and not is_tmp(e.name) and e.is_file():
                    out[e.name] = e.stat().st_size
        return out

    def walk(self) -> dict[str, FileInfo]:
        out: dict[str, FileInfo] = {}
        for directory, dirs, names in os.walk(self.path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # readers' versions (.versions)
            for name in names:
                if not is_tmp(name):
                    p = Path(directory) / name
                    with contextlib.suppress(FileNotFoundError):
                        st = p.stat()
                        out[str(p.relative_to(self.path))] = FileInfo(st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                                      st.st_ino)
        return out

    def find(self, pattern: str) -> dict[str, int]:
        return {str(p.relative_to(self.path)): p.stat().st_mtime_ns for p in self.path.glob(pattern) if p.is_file()}

    def publish(self, name: str, writer: Writer) -> Published:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        digest = ""

        def named(tmp: Path) -> Path:
            nonlocal digest
            digest = file_sha256(tmp)
            return self.path / content_addressed(name, digest)  # same name, same bytes: replacing one is harmless

        final = atomic_write(self.path / name, writer, named)
        stored = str(final.relative_to(self.path))
        st = final.stat()
        return Published(stored, st.st_size, digest, FileInfo(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))

    def sweep(self, orphans: list[str]) -> int:
        self.fence()
        n = sum(remove_stale_tmp(d) for d in (self.path, self.path / "errors") if d.exists())
        with gc_lock(self.path, exclusive=True):  # a held version's files stay (core/storage/versions.py)
            gone = collect(self.path, orphans)
            self.remove(gone)
        return n + len(gone)

    def lock(self, wait: bool = False, lease_s: float = 120.0) -> Lock:
        return DirectoryLock(self.path, wait, store=self)

    def journal(self, name: str) -> LocalJournal:
        return LocalJournal(self, name)

    def view(self, build: Callable[[], View], version: str | None = None) -> Path:
        return local_version(self.path, build, version)

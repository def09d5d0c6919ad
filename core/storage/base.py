"""The interface every stage writes and reads through: a directory of named files, local or in object storage.

What differs between the two stays behind it:

| | local directory | object-store prefix (`s3://`) |
|---|---|---|
| publish a file | temp + fsync + rename to `<stem>-<sha256[:16]><suffix>` | upload under that name (no rename) |
| write a small file | `atomic_write` | one PUT (atomic per object) |
| journal record | one appended + fsynced line | one small object per batch of records |
| lock | `flock` (the kernel frees it when we die) | lease object held by conditional PUTs, fenced |
| read view | a version: the manifest as planned, files by name | a verified local mirror, one per version |

Stage code never asks which one it has.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.core.atomic_io import Writer
from distill.core.errors import DistillError, InputError


def content_addressed(name: str, sha256: str) -> str:
    """``<stem>-<sha256[:16]><suffix>``: the name a published file gets (a name never changes content)."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}-{sha256[:16]}{suffix}"


def local_base(env: str, default: str, url: str) -> Path:
    """A local directory for an object-store URL: $env, else `default`, then the URL made into a path."""
    base = Path(os.environ.get(env) or default).expanduser()
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", url.removeprefix("s3://").strip("/"))


class CacheLockedError(DistillError, RuntimeError):
    """Another job is writing this directory (a local flock, or an object-store prefix's lease)."""

    exit_code = 5


class LockLostError(DistillError, RuntimeError):
    """This job may no longer write: its lease was not renewed in time (fenced), or another job took it (the store
    refused a conditional write). What is committed stays; a re-run continues: exit 6 wherever it happens."""

    exit_code = 6


class UnsupportedStoreError(InputError):
    """The object store (or the installed botocore) lacks what the lease lock needs: conditional writes."""


@dataclass(frozen=True)
class FileInfo:
    """One file's cheap identity: size + mtime (+ ctime + inode locally, + ETag in object storage)."""

    size: int
    mtime_ns: int
    ctime_ns: int | None = None
    inode: int | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Published:
    """A file `publish` wrote: the name a record lists, its bytes, SHA-256 and identity as published."""

    name: str
    size: int
    sha256: str
    info: FileInfo


@dataclass
class View:
    """What a reader needs on local disk: checked files, optional files, and files written last (the manifest)."""

    version: str  # names this state (a hash of the manifest): one mirror directory per version
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 the copy must have
    optional: list[str] = field(default_factory=list)  # copied when present (error files, run summaries)
    last: dict[str, bytes] = field(default_factory=dict)  # written after everything else (what readers trust)


class Lock(ABC):
    """A writer's exclusive hold on a store; `fence()` raises LockLostError when it may no longer write."""

    @abstractmethod
    def __enter__(self) -> Lock: ...

    @abstractmethod
    def __exit__(self, *exc: object) -> None: ...

    def fence(self) -> None:
        """Raise LockLostError if this holder may no longer publish (a flock cannot be lost while we live)."""
        return


class Journal(ABC):
    """A snapshot (a JSON object) plus the records appended since, in order. One writer, under the store's lock.

    `load` gives (snapshot, records); `append` makes one record durable (visible to readers); `compact` writes
    a new snapshot that includes every record and drops the journal. The layer reserves the snapshot key
    ``journal_generation`` (old readers ignore it): a journal belongs to one snapshot generation, so a crash
    between writing a snapshot and dropping the old journal can never apply a record twice or in the wrong place.
    """

    @abstractmethod
    def load(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]: ...

    @abstractmethod
    def append(self, record: dict[str, Any]) -> None: ...

    @abstractmethod
    def compact(self, snapshot: dict[str, Any]) -> None: ...

    def flush(self) -> None:
        """Make every appended record durable now (a batching journal writes them; others already did)."""
        return

    def close(self) -> None:
        """Flush, and release what the writer holds (file descriptors, flusher threads)."""
        self.flush()

    @property
    @abstractmethod
    def pending(self) -> int:
        """Records in the journal since the last snapshot (the writer compacts when this grows)."""

    must_claim = False  # True: a new holder compacts (rewrites the snapshot it read) before its first record, so
    # that a previous holder's requests still on their way are refused by the store (object storage)
    loaded_stamp: tuple | None = None  # what `stamp()` said of the state `load` read (None: cannot tell)

    def stamp(self) -> tuple | None:
        """A cheap identity of the current state; equal to `loaded_stamp` while nothing changed since `load`."""
        return None


class Store(ABC):
    """A directory of named files (names may contain `/`: ``errors/<stem>.jsonl``)."""

    location: str  # a local path or an s3:// URL, for messages and configs
    workdir: Path  # a local directory for this store's files: the directory itself, or where uploads wait

    @abstractmethod
    def child(self, name: str) -> Store:
        """The sub-directory `name` (e.g. a fingerprint directory under a cache root)."""

    @abstractmethod
    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when there is none."""

    @abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Replace the file atomically: readers see the old bytes or the new ones. Fenced by the held lock."""

    @abstractmethod
    def update(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Read-modify-write a small shared file that no store lock covers (the cache root's fingerprint memo):
        `change(old bytes or None)` gives the new bytes (None: leave it). Two writers never lose each other's
        change: a flock locally, a conditional PUT retried on conflict in object storage."""

    @abstractmethod
    def remove(self, names: list[str]) -> None:
        """Delete files (missing ones are fine). Fenced by the held lock."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def listing(self, suffix: str = "") -> dict[str, int]:
        """Files directly in this directory whose names end with `suffix` -> their sizes (no file is read)."""

    @abstractmethod
    def walk(self) -> dict[str, FileInfo]:
        """Every file under this directory, at any depth (``errors/s.jsonl``) -> its identity: one listing.
        Directories whose names start with a dot (readers' versions) are not walked."""

    @abstractmethod
    def find(self, pattern: str) -> dict[str, int]:
        """Files matching a glob relative to this directory (``*/manifest.json``) -> modification time (ns)."""

    @abstractmethod
    def publish(self, name: str, writer: Writer) -> Published:
        """Write a file that a journal record will name, crash-safely, under a content-addressed name
        (``<stem>-<sha256[:16]><suffix>``): a name never changes content, so a reader that planned with it reads
        what it planned with, and nothing is ever half-written under a name a reader may open.

        Local: written to a temp name, fsynced, renamed. Object store: uploaded (no rename there).
        Runs in labelling processes that hold no lock; the record that lists it is written by the lock holder.
        """

    @abstractmethod
    def sweep(self, orphans: list[str]) -> int:
        """Delete `orphans` (files no record names) that no reader's held version lists, and the temp files of
        killed writers. Only the lock holder may call it, before its labellers start (their uploads are not
        listed yet) or after they stopped. Returns how many went."""

    @abstractmethod
    def lock(self, wait: bool = False, lease_s: float = 120.0) -> Lock:
        """The writer's exclusive lock; while it is held, `write`/`remove`/journal writes are fenced by it."""

    @abstractmethod
    def journal(self, name: str) -> Journal:
        """The journal of the snapshot file `name` (e.g. manifest.json)."""

    @abstractmethod
    def view(self, build: Callable[[], View], version: str | None = None) -> Path:
        """A local directory holding this store's files as `build()` names them, for readers.

        Local: a version directory ``.versions/<version>/`` with the manifest as it is now, its files read from
        the directory by name (core/storage/versions.py). Object store: a mirror per version under
        $DISTILL_MIRROR_DIR, files checked against their SHA-256. Either is held by this process (a shared flock)
        and the writer keeps what a held version lists; `version` (from a job spec) refuses any other state, so
        a long-lived worker never trusts an older one and a refresh never changes files a running job reads.
        """

"""An object-store prefix (`s3://bucket/prefix`) behind the `Store` interface.

No rename: published files get content-addressed names, and the journal record naming them is written after
them. No flock: a `LeaseLock`, and every write of the lock holder is fenced by it. Journal records are batched
into one object per flush (a flusher thread writes what arrived within `FLUSH_S`), so a labelled shard costs
its read, its cache file's PUT and a fraction of a journal PUT.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.core import object_store
from distill.core.atomic_io import Writer, file_sha256, remove_stale_tmp, tmp_path_for
from distill.core.storage.base import Journal, Lock, Store, View, local_base
from distill.core.storage.journal import decode_records, encode_record, split_generation, with_generation
from distill.core.storage.lease import LeaseLock

FLUSH_S = 0.25  # journal records that arrive within this are written as one object


def content_addressed(name: str, sha256: str) -> str:
    stem, suffix = os.path.splitext(name)
    return f"{stem}-{sha256[:16]}{suffix}"


class ObjectJournal(Journal):
    """``<stem>.<generation>.journal/<first record number>.jsonl`` objects under the store's prefix."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store, self.name = store, name
        self.generation = 0
        self._count = 0  # records in the current generation (written or buffered)
        self._keys: list[str] = []  # journal objects of this generation
        self._buffer: list[bytes] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._flushing = threading.Lock()  # one flush at a time: objects land in record order
        self._thread: threading.Thread | None = None
        self._loaded = False

    def prefix(self, generation: int) -> str:
        return object_store.join(self.store.url, f"{Path(self.name).stem}.{generation}.journal")

    def load(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The snapshot, then the journal objects in order: each is named by the number of its first record, so
        the next one's name is known and no LIST is needed (a clean cache: one GET that finds nothing)."""
        url = object_store.join(self.store.url, self.name)
        for _ in range(5):  # compacted while we read: read again
            got = object_store.get_with_etag(url)
            raw = _json_object(got[0], url) if got is not None else None
            snapshot, generation = split_generation(raw)
            keys, records = self._chain(generation)
            if object_store.head_etag(url) == (got[1] if got is not None else None):
                self.generation, self._count, self._keys, self._loaded = generation, len(records), keys, True
                return snapshot, records
        raise OSError(f"{url}: replaced on every read (another writer without the lock?)")

    def _chain(self, generation: int) -> tuple[list[str], list[dict[str, Any]]]:
        """The journal objects of a generation and their records, following the names (no LIST)."""
        keys: list[str] = []
        records: list[dict[str, Any]] = []
        while (data := object_store.get_bytes(self._key(generation, len(records)))) is not None:
            batch = decode_records(data)[0]
            if not batch:
                break
            keys.append(self._key(generation, len(records)))
            records += batch
        return keys, records

    def _key(self, generation: int, first: int) -> str:
        return object_store.join(self.prefix(generation), f"{first:012d}.jsonl")

    def append(self, record: dict[str, Any]) -> None:
        self._raise_flush_error()
        self.store.fence()
        if not self._loaded:
            self.load()
        with self._cond:
            self._buffer.append(encode_record(record))
            if self._thread is None:
                self._thread = threading.Thread(target=self._flusher, name="journal-flush", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _flusher(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and self._thread is not None:
                    self._cond.wait()
                if self._thread is None:
                    return
            time.sleep(FLUSH_S)  # let the records of the next moment join this object
            try:
                self.flush()
            except BaseException as exc:  # noqa: BLE001 - handed to the writer's next append/flush
                self._error = exc

    def flush(self) -> None:
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._cond:
            batch, self._buffer = self._buffer, []
        if not batch:
            self._raise_flush_error()
            return
        self.store.fence()  # on failure the batch is dropped: its shards' files are orphans, relabelled
        key = self._key(self.generation, self._count)
        object_store.put_bytes(key, b"".join(batch))
        self._keys.append(key)
        self._count += len(batch)

    def _raise_flush_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def compact(self, snapshot: dict[str, Any]) -> None:
        with self._flushing:  # no batch lands in the old generation after its objects are listed for deletion
            self._flush()
            self.store.fence()
            if not self._loaded:
                self.load()
            old, stale = self.generation, list(self._keys)
            object_store.put_bytes(object_store.join(self.store.url, self.name), with_generation(snapshot, old + 1))
            stale += self._chain(old - 1)[0] if old > 0 else []  # a crash's leftovers (never read: old generation)
            object_store.delete_many(stale)
            self.generation, self._count, self._keys = old + 1, 0, []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._thread = None
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._count + len(self._buffer)


def _json_object(data: bytes, url: str) -> dict[str, Any]:
    import json

    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{url}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{url}: not a JSON object")
    return raw


class ObjectStore(Store):
    """A prefix in object storage; `staging` is a local directory for files on their way up."""

    def __init__(self, url: str, staging: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.location = self.url
        self.staging = Path(staging) if staging is not None else local_base(
            "DISTILL_STAGING_DIR", "~/.cache/distill/staging", self.url)
        self.workdir = self.staging
        self._lock: LeaseLock | None = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "location": self.location, "staging": self.staging, "workdir": self.workdir,
                "_lock": None}

    def child(self, name: str) -> ObjectStore:
        return ObjectStore(object_store.join(self.url, name), self.staging / name)

    def fence(self) -> None:
        if self._lock is not None:
            self._lock.fence()

    def _url(self, name: str) -> str:
        return object_store.join(self.url, name)

    def read(self, name: str) -> bytes | None:
        return object_store.get_bytes(self._url(name))

    def write(self, name: str, data: bytes) -> None:
        self.fence()
        object_store.put_bytes(self._url(name), data)

    def remove(self, names: list[str]) -> None:
        self.fence()
        object_store.delete_many([self._url(n) for n in names])

    def exists(self, name: str) -> bool:
        return object_store.head_etag(self._url(name)) is not None

    def listing(self, suffix: str = "") -> dict[str, int]:
        return {u.rsplit("/", 1)[-1]: i.size for u, i in object_store.list_dir(self.url).items()
                if u.endswith(suffix)}

    def walk(self) -> dict[str, int]:
        return {u.removeprefix(self.url + "/"): i.size for u, i in object_store.walk(self.url).items()}

    def find(self, pattern: str) -> dict[str, int]:
        return {u.removeprefix(self.url + "/"): i.mtime_ns for u, i in object_store.glob(self._url(pattern)).items()}

    def publish(self, name: str, writer: Writer) -> tuple[str, int, str]:
        self.staging.mkdir(parents=True, exist_ok=True)  # a labeller on another node makes its own
        tmp = tmp_path_for(self.staging / name)
        try:
            writer(tmp)
            size, digest = tmp.stat().st_size, file_sha256(tmp)
            stored = content_addressed(name, digest)
            object_store.put_file(tmp, self._url(stored))
        finally:
            tmp.unlink(missing_ok=True)
        return stored, size, digest

    def sweep(self, orphans: list[str]) -> int:
        self.fence()
        n = remove_stale_tmp(self.staging) if self.staging.exists() else 0
        self.remove(orphans)
        return n + len(orphans)

    def lock(self, wait: bool = False, lease_s: float = 120.0) -> Lock:
        def held(lock: LeaseLock | None) -> None:
            self._lock = lock

        return LeaseLock(self._url(".lock"), lease_s, wait, on_change=held)

    def journal(self, name: str) -> ObjectJournal:
        return ObjectJournal(self, name)

    def view(self, build: Callable[[], View], version: str | None = None) -> Path:
        from distill.core.storage.mirror import materialize

        return materialize(self.url, build, version)

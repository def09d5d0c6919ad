"""An object-store prefix (`s3://bucket/prefix`) behind the `Store` interface.

No rename: published files get content-addressed names, and the journal record naming them is written after
them. No flock: a `LeaseLock`, and every write of the lock holder is fenced twice: on its own clock before the
request (`fence`), and by the store itself, which applies the request only to the object the holder last saw:
the snapshot is replaced with ``If-Match`` its last ETag (``If-None-Match: *`` when there was none), journal
objects are created with ``If-None-Match: *``, and objects are deleted with ``If-Match``. A request that passed
the clock check and lands late (network, retries, a paused process) after another job took over therefore
changes nothing: the store answers 412 and the holder raises `LockLostError`. A new holder rewrites the snapshot
before its first record (`Journal.must_claim`), so a stale holder's snapshot or journal can never land over its work.
Journal records are batched into one object per flush (a flusher thread writes what arrived within
`FLUSH_S`), so a labelled shard costs its read, its cache file's PUT and a fraction of a journal PUT.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.core import object_store
from distill.core.atomic_io import Writer, file_sha256, remove_stale_tmp, tmp_path_for
from distill.core.storage.base import (
    FileInfo,
    Journal,
    Lock,
    LockLostError,
    Published,
    Store,
    View,
    content_addressed,
    local_base,
)
from distill.core.storage.journal import decode_records, encode_record, split_generation, with_generation
from distill.core.storage.lease import LeaseLock
from distill.core.storage.names import check_name

FLUSH_S = 0.25  # journal records that arrive within this are written as one object


class ObjectJournal(Journal):
    """``<stem>.<generation>.journal/<first record number>.jsonl`` objects under the store's prefix."""

    must_claim = True  # a stale holder may still have requests on their way (see the module docstring)

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store, self.name = store, name
        self.generation = 0
        self._count = 0  # records in the current generation (written or buffered)
        self._keys: dict[str, str] = {}  # journal objects of this generation -> their ETags
        self._snapshot_etag: str | None = None  # of the snapshot as we last read or wrote it (None: there was none)
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
            etag = got[1] if got is not None else None
            if object_store.head_etag(url) == etag:
                self.generation, self._count, self._keys, self._loaded = generation, len(records), keys, True
                self._snapshot_etag = etag
                return snapshot, records
        raise OSError(f"{url}: replaced on every read (another writer without the lock?)")

    def _chain(self, generation: int) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The journal objects of a generation (-> ETag) and their records, following the names (no LIST)."""
        keys: dict[str, str] = {}
        records: list[dict[str, Any]] = []
        while (got := object_store.get_with_etag(self._key(generation, len(records)))) is not None:
            batch = decode_records(got[0])[0]
            if not batch:
                break
            keys[self._key(generation, len(records))] = got[1]
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
        self._keys[key] = _put_fenced(key, b"".join(batch), None)  # a new name: If-None-Match
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
            old = self.generation
            url = object_store.join(self.store.url, self.name)
            self._snapshot_etag = _put_fenced(url, with_generation(snapshot, old + 1), self._snapshot_etag)
            self.generation, self._count, keys, self._keys = old + 1, 0, self._keys, {}
            self.store.fence()
            stale = {**self._older_generations(old + 1), **keys}  # ours, a crash's and a stale writer's leftovers
            _delete_fenced(list(stale.items()))

    def _older_generations(self, current: int) -> dict[str, str]:
        """Journal objects of every generation before `current` (never read again), from one LIST of the
        journal prefixes: a crash between a snapshot and its deletes, or a stale writer's late object, leaves
        some; without this they would stay forever."""
        stem = Path(self.name).stem
        out: dict[str, str] = {}
        for u, info in object_store.walk(self.store.url, prefix=f"{stem}.").items():
            name = u.removeprefix(self.store.url + "/")
            generation = name.removeprefix(f"{stem}.").split(".journal/", 1)[0]
            if ".journal/" in name and generation.isdigit() and int(generation) < current:
                out[u] = info.etag
        return out

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


def _put_fenced(url: str, data: bytes, etag: str | None) -> str:
    """A conditional PUT (If-Match `etag`, If-None-Match when None); a refusal is `LockLostError`, unless the
    object holds exactly our bytes (an earlier attempt of this same write landed and only its answer was lost)."""
    try:
        return object_store.put_conditional(url, data, etag)
    except object_store.PreconditionFailedError:
        got = object_store.get_with_etag(url)
        if got is not None and got[0] == data:
            return got[1]
        raise LockLostError(f"{url}: changed by another writer since this job last saw it (the store refused "
                            "the write: If-Match / If-None-Match); this job no longer holds the lock and writes "
                            "nothing more; what is committed stays; re-run to continue") from None


def _delete_fenced(items: list[tuple[str, str]]) -> None:
    """Conditional DELETEs (If-Match each object's ETag as we last saw it); a refusal is `LockLostError`."""
    refused = object_store.delete_conditional(items)
    if refused:
        raise LockLostError(f"{refused[0]}: changed by another writer since this job listed it (the store refused "
                            "the DELETE: If-Match); this job no longer holds the lock and writes nothing more; "
                            "re-run to continue")


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
        self._etags: dict[str, str | None] = {}  # name -> ETag as last read, listed or written (None: absent)

    def __getstate__(self) -> dict:
        return {"url": self.url, "location": self.location, "staging": self.staging, "workdir": self.workdir,
                "_lock": None, "_etags": {}}

    def child(self, name: str) -> ObjectStore:
        return ObjectStore(object_store.join(self.url, name), self.staging / name)

    def fence(self) -> None:
        if self._lock is not None:
            self._lock.fence()

    def _url(self, name: str) -> str:
        return object_store.join(self.url, name)

    def read(self, name: str) -> bytes | None:
        got = object_store.get_with_etag(self._url(name))
        self._etags[name] = got[1] if got is not None else None
        return got[0] if got is not None else None

    def _etag(self, name: str) -> str | None:
        """The object's ETag as we last saw it, else as it is now (one HEAD, before the fence check)."""
        if name not in self._etags:
            self._etags[name] = object_store.head_etag(self._url(name))
        return self._etags[name]

    def write(self, name: str, data: bytes) -> None:
        etag = self._etag(name)
        self.fence()
        self._etags[name] = _put_fenced(self._url(name), data, etag)

    def update(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        url = self._url(name)
        for _ in range(20):
            got = object_store.get_with_etag(url)
            if (data := change(got[0] if got is not None else None)) is None:
                return
            try:
                object_store.put_conditional(url, data, got[1] if got is not None else None)
                return
            except object_store.PreconditionFailedError:
                continue  # another writer changed it between our GET and PUT: apply ours to theirs
        raise OSError(f"{url}: changed by other writers on every one of 20 tries")

    def remove(self, names: list[str]) -> None:
        known = [(n, self._etag(n)) for n in names]
        self.fence()
        _delete_fenced([(self._url(n), e) for n, e in known if e is not None])
        self._etags.update({n: None for n in names})

    def exists(self, name: str) -> bool:
        return object_store.head_etag(self._url(name)) is not None

    def listing(self, suffix: str = "") -> dict[str, int]:
        listed = {check_name(u.rsplit("/", 1)[-1], self.url): i for u, i in object_store.list_dir(self.url).items()
                  if u.endswith(suffix)}
        self._etags.update({n: i.etag for n, i in listed.items()})
        return {n: i.size for n, i in listed.items()}

    def walk(self) -> dict[str, FileInfo]:
        listed = {check_name(u.removeprefix(self.url + "/"), self.url): i
                  for u, i in object_store.walk(self.url).items()}
        listed = {n: i for n, i in listed.items() if not n.startswith(".") and "/." not in n}
        self._etags.update({n: i.etag for n, i in listed.items()})
        return {n: FileInfo(i.size, i.mtime_ns, etag=i.etag) for n, i in listed.items()}

    def find(self, pattern: str) -> dict[str, int]:
        return {u.removeprefix(self.url + "/"): i.mtime_ns for u, i in object_store.glob(self._url(pattern)).items()}

    def publish(self, name: str, writer: Writer) -> Published:
        tmp = tmp_path_for(self.staging / name)
        tmp.parent.mkdir(parents=True, exist_ok=True)  # a labeller on another node makes its own
        try:
            writer(tmp)
            size, digest = tmp.stat().st_size, file_sha256(tmp)
            stored = content_addressed(name, digest)
            etag = object_store.upload(tmp, self._url(stored))
        finally:
            tmp.unlink(missing_ok=True)
        return Published(stored, size, digest, FileInfo(size, 0, etag=etag))

    def sweep(self, orphans: list[str]) -> int:
        self.fence()
        n = sum(remove_stale_tmp(d) for d in (self.staging, self.staging / "errors") if d.exists())
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

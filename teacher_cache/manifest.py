"""The manifest: which shard produced which cache file, from which input identity, with which checksum.

Written only by the driver (one writer, under the store's lock) through the storage layer's journal: a finished
shard costs one record (an appended, fsynced line locally; a share of one small object in object storage), not a
rewrite of the whole manifest. The snapshot (`manifest.json`) is rewritten only when the journal has grown as
long as it (so O(1) per shard), at the end of a run, and by the next writer after a crash. Readers read the
snapshot plus the journal, so they see every finished shard; a reader accepts only files listed here whose
checksum matches, so a file left by a killed job (or named by a torn record) is never read as complete.

`manifest.json` keeps its old format; this build adds the top-level keys ``journal_generation`` and
``shard_stats`` (per shard: labelled rows, teacher top-1 hits, top-k mass), ``shard_seen_ns`` (when each
shard's identity was taken, for racy identities: ShardIdentity.racy) and ``shard_files`` (per shard: its error
file and checksum, and the cache file's own identity: mtime/ctime/inode, or its ETag in object storage), which
older builds ignore. Older builds read only the snapshot, so during a run they see the shards of its last
compaction.

Every name is checked when a manifest is read (core/storage/names.py): a shard name is one plain path part and a
file name has the form the writer gives it, so a manifest written by someone else cannot point a reader, or a
mirror's copy, outside the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from distill.core.atomic_io import checksum_matches
from distill.core.storage import CacheLockedError, FileInfo, Journal, Store, open_store  # noqa: F401 - re-exported
from distill.core.storage.journal import should_compact
from distill.core.storage.local import DirectoryLock  # noqa: F401 - re-exported (tests take the lock of a directory)
from distill.core.storage.names import UnsafeNameError, cache_file_name, check_part, errors_file_name
from distill.images.shards import ShardIdentity, ShardPath, file_sha256
from distill.teacher_cache.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
STATS = ("labelled", "top1_correct", "topk_mass")  # in `shard_stats` of the snapshot, beside the old entries
SEEN = "shard_seen_ns"  # snapshot key: stem -> ShardEntry.seen_ns (beside the old entries, which older builds read)
FILES = "shard_files"  # snapshot key: stem -> the FILE_FIELDS of its entry (beside the old entries)
FILE_FIELDS = ("errors_file", "errors_sha256", "file_mtime_ns", "file_ctime_ns", "file_inode", "file_etag")


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
    labelled: int | None = None  # rows with a label (None: written before the manifest counted them)
    top1_correct: int | None = None  # labelled rows whose view-0 teacher top-1 is the label
    topk_mass: float | None = None  # sum over rows and views of the probability the stored top-k holds
    seen_ns: int | None = None  # when the identity was taken (ShardIdentity.racy); None: an older build's entry
    errors_file: str | None = None  # errors/<stem>-<sha16>.jsonl when the shard had errors (None: none, or an
    errors_sha256: str | None = None  # older build's errors/<stem>.jsonl, which carries no checksum)
    file_mtime_ns: int | None = None  # the cache file's own identity as published (None: an older build's entry):
    file_ctime_ns: int | None = None  # a refresh or a reader that finds it moved checks the file's checksum
    file_inode: int | None = None
    file_etag: str | None = None  # in object storage

    def file_info(self) -> FileInfo | None:
        """The cache file's identity as published, or None when the entry does not record one."""
        if self.file_etag is None and self.file_mtime_ns is None:
            return None
        return FileInfo(self.file_bytes, self.file_mtime_ns or 0, self.file_ctime_ns, self.file_inode, self.file_etag)

    def files(self, stem: str) -> set[str]:
        """The files this entry names: its cache file and its error file (an older build's unnamed one too)."""
        errors = self.errors_file or (f"errors/{stem}.jsonl" if self.errors else None)
        return {self.file} | ({errors} if errors else set())

    def check_names(self, stem: str, where: str) -> None:
        """Refuse names that are not the writer's (see the module docstring)."""
        check_part(stem, where)
        where = f"{where}, shard {stem!r}"
        cache_file_name(self.file, stem, where)
        if self.errors_file is not None:
            errors_file_name(self.errors_file, stem, where)

    def identity(self) -> ShardIdentity:
        return ShardIdentity(self.size, self.mtime_ns, self.content_sha256, self.ctime_ns, self.inode, self.etag,
                             self.seen_ns)

    def update_identity(self, ident: ShardIdentity, source: str) -> None:
        """Same content, moved cheap identity (touched, copied): remember the new one so we never hash it again."""
        self.size, self.mtime_ns, self.ctime_ns, self.inode = ident.size, ident.mtime_ns, ident.ctime_ns, ident.inode
        self.etag, self.seen_ns = ident.etag, ident.seen_ns
        self.source = source

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        """From a snapshot or a record; fields a newer build added are ignored, not an error."""
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})


_FIELD_ORDER = [f.name for f in fields(ShardEntry)]
_FIELDS = set(_FIELD_ORDER)


@dataclass
class Manifest:
    fingerprint: str
    teacher: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    shards: dict[str, ShardEntry] = field(default_factory=dict)

    @classmethod
    def from_parts(cls, snapshot: dict[str, Any] | None, records: list[dict[str, Any]], where: str,
                   fingerprint: str | None = None) -> Manifest | None:
        """The snapshot with the journal's records applied in order (the last record of a shard wins)."""
        if snapshot is None and not records:
            return None
        try:
            if snapshot is None:
                raise KeyError("the journal has records but there is no snapshot")
            stats, seen, extra = snapshot.get("shard_stats", {}), snapshot.get(SEEN, {}), snapshot.get(FILES, {})
            shards = {k: ShardEntry.from_dict({**v, **stats.get(k, {}), "seen_ns": seen.get(k), **extra.get(k, {})})
                      for k, v in snapshot.get("shards", {}).items()}
            for r in records:
                shards[r["shard"]] = ShardEntry.from_dict(r["entry"])
            for stem, entry in shards.items():
                entry.check_names(stem, where)
            m = cls(fingerprint=snapshot["fingerprint"], teacher=snapshot.get("teacher", {}),
                    schema_version=int(snapshot["schema_version"]), shards=shards)
        except UnsafeNameError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: damaged manifest ({exc}); delete the directory to rebuild the cache") from exc
        if fingerprint is not None and m.fingerprint != fingerprint:
            raise ValueError(f"{where}: manifest is for fingerprint {m.fingerprint}, expected {fingerprint}")
        return m

    @classmethod
    def read(cls, journal: Journal, where: str, fingerprint: str | None = None) -> Manifest | None:
        """Snapshot + journal through `journal`; None when there is no manifest."""
        try:
            snapshot, records = journal.load()
        except ValueError as exc:
            raise ValueError(f"{where}: damaged manifest ({exc}); delete the directory to rebuild the cache") from exc
        return cls.from_parts(snapshot, records, where, fingerprint)

    @classmethod
    def load(cls, where: Path | Store, fingerprint: str | None = None) -> Manifest | None:
        """Snapshot + journal of a directory (local or a store); None when there is no manifest."""
        store = where if isinstance(where, Store) else open_store(where)
        return cls.read(store.journal(MANIFEST_NAME), f"{store.location}/{MANIFEST_NAME}", fingerprint)

    def snapshot(self) -> dict[str, Any]:
        """The snapshot as written: old readers' format (entries without the new fields) + `shard_stats` and
        `shard_seen_ns`."""
        shards, stats, seen, extra = {}, {}, {}, {}
        for k, v in sorted(self.shards.items()):
            d = {f: getattr(v, f) for f in _FIELD_ORDER}  # (asdict deep-copies: 30x slower at 20,000 shards)
            stats[k] = {s: d.pop(s) for s in STATS}
            if (ns := d.pop("seen_ns")) is not None:
                seen[k] = ns
            if files := {f: value for f in FILE_FIELDS if (value := d.pop(f)) is not None}:
                extra[k] = files
            shards[k] = d
        out = {"schema_version": self.schema_version, "fingerprint": self.fingerprint, "teacher": self.teacher,
               "shards": shards, "shard_stats": stats}
        return {**out, **({SEEN: seen} if seen else {}), **({FILES: extra} if extra else {})}

    def version(self, snapshot: dict[str, Any] | None = None) -> str:
        """A hash of everything the manifest says: names one state of the cache (a reader's mirror, a job).
        `snapshot`: this manifest's `snapshot()` when the caller has it already."""
        snap = self.snapshot() if snapshot is None else snapshot
        return hashlib.sha256(json.dumps(snap, sort_keys=True).encode()).hexdigest()[:20]

    def save(self, where: Path | Store) -> None:
        """Write the whole manifest as the new snapshot (the journal it includes is dropped)."""
        store = where if isinstance(where, Store) else open_store(where)
        journal = store.journal(MANIFEST_NAME)
        journal.compact(self.snapshot())
        journal.close()


class ManifestWriter:
    """The lock holder's manifest: `put` journals one shard (O(1)); the snapshot is rewritten when the journal
    has grown as long as it, at `finish`, and on `open` when a killed run left records behind."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.journal = store.journal(MANIFEST_NAME)
        self._manifest: Manifest | None = None
        self.snapshot_entries = 0  # shards in the last snapshot written or read
        self.replaced: list[str] = []  # files of entries `put` replaced (collected once no reader holds them)
        self._claimed = not self.journal.must_claim  # object storage: rewrite the snapshot before the first record

    @property
    def manifest(self) -> Manifest:
        """The manifest being written (after `open` found one, or `start`)."""
        if self._manifest is None:
            raise RuntimeError("ManifestWriter: open() a manifest or start() one first")
        return self._manifest

    def manifest_or_none(self) -> Manifest | None:
        return self._manifest

    def open(self, fingerprint: str) -> Manifest | None:
        self._manifest = Manifest.read(self.journal, f"{self.store.location}/{MANIFEST_NAME}", fingerprint)
        self.snapshot_entries = len(self._manifest.shards) if self._manifest is not None else 0
        if self._manifest is not None and self.journal.pending:
            self.compact()  # fold in a killed run's records (which also claims the snapshot: see `put`)
        return self._manifest

    def start(self, manifest: Manifest) -> None:
        """Begin with `manifest` (a new cache, or identities of touched shards updated): write it once."""
        self._manifest = manifest
        self.compact()

    def put(self, stem: str, entry: ShardEntry) -> None:
        if not self._claimed:  # a previous holder's requests still on their way now fail at the store
            self.compact()
        if (previous := self.manifest.shards.get(stem)) is not None:
            self.replaced += sorted(previous.files(stem) - entry.files(stem))
        self.manifest.shards[stem] = entry
        self.journal.append({"shard": stem, "entry": asdict(entry)})
        if should_compact(self.journal.pending, self.snapshot_entries):
            self.compact()

    def compact(self) -> None:
        self.journal.compact(self.manifest.snapshot())
        self.snapshot_entries = len(self.manifest.shards)
        self._claimed = True

    def flush(self) -> None:
        self.journal.flush()

    def finish(self) -> None:
        """Compact if anything was journalled, and release the journal."""
        try:
            self.journal.flush()  # a batch on its way counts once it has landed
            if self.journal.pending:
                self.compact()
        finally:
            self.journal.close()

    def abandon(self) -> None:
        """After a failure: keep what can be kept without raising over the failure (a lost lock writes nothing;
        journalled records stay and the next writer folds them in)."""
        try:
            self.finish()
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("manifest not compacted after the failure (%s); the next run does it", exc)


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


def cache_file_altered(path: Path, entry: ShardEntry) -> bool:
    """The file's own identity (mtime, ctime, inode) moved since it was published and its checksum no longer
    matches: a same-size rewrite that the size and the footer cannot see. One stat while nothing moved; the
    checksum at most once per process per state of the file. Entries of older builds record no identity."""
    recorded = entry.file_info()
    if recorded is None or recorded.etag is not None:
        return False  # an older build's entry, or an object-store file (its mirror copy was checked)
    try:
        st = path.stat()
    except OSError:
        return True
    if (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (recorded.mtime_ns, recorded.ctime_ns, recorded.inode):
        return False
    return not checksum_matches(path, entry.file_sha256)


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
    object), then the content hash if any moved or the recorded identity was racy (seen within a clock tick of a
    write: ShardIdentity.racy). ``cache_file_check`` replaces the local check of each listed
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
                verify_cache_files and file_sha256(cache_file) != entry.file_sha256) or \
                cache_file_altered(cache_file, entry)
        if damaged:
            plan.todo.append((stem, path, "cache file missing or damaged"))
            continue
        ident = ShardIdentity.stat(path)
        recorded = entry.identity()
        if entry.source == str(path) and ident.same_cheap(recorded) and not recorded.racy():
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

"""A cache root in object storage (``cache_root: s3://bucket/prefix``).

Writer (`distill cache`): works in a local staging directory with the same layout as a local cache, holds an
`ObjectLock` on ``<root>/<fingerprint>/``, and publishes to the store in the order a reader can trust:

1. each labeller uploads its Parquet file under its final, content-addressed name ``<stem>-<sha256[:16]>.parquet``
   (object stores have no rename; a name that is never reused cannot be half-written under a reader);
2. the driver then uploads the per-shard error file and, last, ``manifest.json`` (one PUT, atomic per object).

A file uploaded by a run killed before its manifest PUT is listed nowhere; the next run deletes such orphans
under the lock. Readers never list the prefix: they read the manifest and fetch what it names.

Reader (training, compress, `distill cache inspect`): `mirror()` downloads the manifest and the files it lists
into a local mirror, checking each file's SHA-256 against the manifest, and hands the local directory to the
ordinary `CacheReader`. Files already mirrored with the right size and checksum are not fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from core import object_store
from core.atomic_io import atomic_write
from teacher_cache.manifest import MANIFEST_NAME, Manifest, ShardEntry
from teacher_cache.reader import ERRORS_DIR, checksum_matches, remember_verified

log = logging.getLogger(__name__)


def content_addressed_name(stem: str, sha256: str) -> str:
    return f"{stem}-{sha256[:16]}.parquet"


def _local_base(env: str, default: str, url: str) -> Path:
    base = Path(os.environ.get(env) or default).expanduser()
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", url.removeprefix("s3://").strip("/"))


def staging_root(url: str, staging_dir: Path | None = None) -> Path:
    """The writer's local working directory for a cache root URL (config `staging_dir`, else under ~/.cache)."""
    return Path(staging_dir) if staging_dir is not None else _local_base(
        "DISTILL_STAGING_DIR", "~/.cache/distill/staging", url)


def mirror_root(url: str) -> Path:
    """Where readers keep their verified copy of a cache root URL ($DISTILL_MIRROR_DIR, else under ~/.cache)."""
    return _local_base("DISTILL_MIRROR_DIR", "~/.cache/distill/mirror", url)


def publish_cache_file(local: Path, remote_dir: str, stem: str, sha256: str) -> str:
    """Upload a finished cache file under its content-addressed name; the local copy is removed. Returns the name."""
    name = content_addressed_name(stem, sha256)
    object_store.put_file(local, object_store.join(remote_dir, name))
    local.unlink(missing_ok=True)
    return name


class RemoteCacheDir:
    """The writer's side of ``<root>/<fingerprint>/`` in object storage, mirrored by a local staging directory."""

    def __init__(self, url: str, local: Path) -> None:
        self.url, self.local = url.rstrip("/"), local
        self._sizes: dict[str, int] | None = None

    def pull_manifest(self) -> None:
        """The store's manifest is the truth: replace the staging copy with it (or drop a stale one)."""
        data = object_store.get_bytes(object_store.join(self.url, MANIFEST_NAME))
        self.local.mkdir(parents=True, exist_ok=True)
        if data is None:
            (self.local / MANIFEST_NAME).unlink(missing_ok=True)
        else:
            atomic_write(self.local / MANIFEST_NAME, data)

    def sizes(self) -> dict[str, int]:
        """Cache files in the store and their sizes: one listing, no object reads."""
        if self._sizes is None:
            self._sizes = {u.rsplit("/", 1)[-1]: i.size for u, i in object_store.list_dir(self.url).items()}
        return self._sizes

    def check(self, entry: ShardEntry) -> str | None:
        """The listed cache file exists in the store with the recorded size (what a listing can tell)."""
        size = self.sizes().get(entry.file)
        if size is None:
            return f"{object_store.join(self.url, entry.file)} is missing"
        return None if size == entry.file_bytes else f"{entry.file}: {size} bytes, the manifest says {entry.file_bytes}"

    def remove_orphans(self, manifest: Manifest | None) -> int:
        """Delete cache files the manifest does not list (uploaded by a killed run, or replaced by a relabel)."""
        keep = {e.file for e in manifest.shards.values()} if manifest is not None else set()
        orphans = [n for n in self.sizes() if n.endswith(".parquet") and n not in keep]
        for name in orphans:
            object_store.delete(object_store.join(self.url, name))
            self.sizes().pop(name, None)
        return len(orphans)

    def push(self, name: str) -> None:
        """Upload one staging file (manifest, summary, error file) to the same name in the store."""
        object_store.put_file(self.local / name, object_store.join(self.url, name))

    def push_errors(self, stem: str) -> None:
        """The shard's error file as it is in staging now: uploaded, or deleted from the store when gone."""
        name = f"{ERRORS_DIR}/{stem}.jsonl"
        if (self.local / name).exists():
            self.push(name)
        else:
            object_store.delete(object_store.join(self.url, name))


def _manifests_newest_first(root: str) -> list[str]:
    """URLs of the fingerprint directories under a root, the most recently written manifest first."""
    found = object_store.filesystem().glob(object_store.join(root, "*", MANIFEST_NAME), detail=True)
    if not found:
        raise FileNotFoundError(f"{root}: no cache found; run `distill cache` first")
    ordered = sorted(found.values(), key=lambda e: e["LastModified"].timestamp() if e.get("LastModified") else 0,
                     reverse=True)
    return ["s3://" + e["name"].removeprefix("s3://").rsplit("/", 1)[0] for e in ordered]


def _newest_fingerprint_dir(root: str) -> str:
    return _manifests_newest_first(root)[0]


def remote_teachers_newest_first(root: str) -> list[tuple[str, dict]]:
    """(fingerprint, teacher info of its manifest) for every cache under an object-store root, newest first."""
    return [(url.rsplit("/", 1)[-1],
             json.loads(object_store.get_bytes(object_store.join(url, MANIFEST_NAME)) or b"{}").get("teacher", {}))
            for url in _manifests_newest_first(root)]


def mirror(root: str, fingerprint: str | None = None) -> Path:
    """A verified local copy of the cache under an object-store root: the named fingerprint, or the newest.

    A refresh that replaces a shard's file while we copy can delete the old name from under us (it removes files
    no manifest lists): then the manifest is read again once, and the copy goes on from the new one.
    """
    remote = object_store.join(root, fingerprint) if fingerprint else _newest_fingerprint_dir(root)
    try:
        return _mirror_once(root, remote)
    except _Replaced:
        return _mirror_once(root, remote, last_try=True)


class _Replaced(Exception):
    """A listed file was gone (replaced by a refresh since we read the manifest)."""


def _mirror_once(root: str, remote: str, last_try: bool = False) -> Path:
    raw = object_store.get_bytes(object_store.join(remote, MANIFEST_NAME))
    if raw is None:
        raise FileNotFoundError(f"{remote}: no manifest; run `distill cache` with that teacher and cache_root")
    fp = remote.rsplit("/", 1)[-1]
    local = mirror_root(root) / fp
    (local / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
    shards = json.loads(raw).get("shards", {})
    fetched = 0
    for stem, entry in sorted(shards.items()):
        target = local / entry["file"]
        if target.exists() and target.stat().st_size == entry["file_bytes"] and \
                checksum_matches(target, entry["file_sha256"]):  # remembered: the reader does not hash it again
            continue
        data = object_store.get_bytes(object_store.join(remote, entry["file"]))
        if data is None and not last_try:
            raise _Replaced(entry["file"])
        if data is None or hashlib.sha256(data).hexdigest() != entry["file_sha256"]:
            raise OSError(f"{object_store.join(remote, entry['file'])}: missing or not the file the manifest "
                          "lists (checksum); re-run `distill cache` over that shard")
        atomic_write(target, data)
        remember_verified(target, entry["file_sha256"])
        fetched += 1
        errors = object_store.get_bytes(object_store.join(remote, ERRORS_DIR, f"{stem}.jsonl"))
        if errors is not None:
            atomic_write(local / ERRORS_DIR / f"{stem}.jsonl", errors)
        else:
            (local / ERRORS_DIR / f"{stem}.jsonl").unlink(missing_ok=True)
    for name in ("last_run.json", "cache_config.resolved.yaml"):
        if (data := object_store.get_bytes(object_store.join(remote, name))) is not None:
            atomic_write(local / name, data)
    atomic_write(local / MANIFEST_NAME, raw)  # last: the local reader trusts only what it lists
    listed = {e["file"] for e in shards.values()}
    for old in local.glob("*.parquet"):  # files of shards relabelled since the last mirror
        if old.name not in listed:
            old.unlink(missing_ok=True)
    log.info("mirrored %s to %s (%d file(s) fetched, %d already there)", remote, local, fetched,
             len(shards) - fetched)
    return local

"""One storage layer for every stage: shards, cache files, the manifest and its journal, error files, locks, staging.

    store = open_store(cfg.cache_root, staging_dir=cfg.staging_dir).child(fingerprint)
    with store.lock(wait, lease_s):            # flock, or a lease object fenced on our clock
        snapshot, records = store.journal("manifest.json").load()
        published = store.publish("s.parquet", writer)  # s-<sha16>.parquet: renamed, or uploaded
        store.journal("manifest.json").append(record)           # fsynced line, or a batched object
    directory = store.view(build)              # a held version: the manifest as planned, files by name

`base` says what differs between a local directory and an object-store prefix and where; `locations` does the
same for input files (shards).
"""

from __future__ import annotations

from pathlib import Path

from distill.core import object_store
from distill.core.storage.base import (
    CacheLockedError,
    FileInfo,
    Journal,
    Lock,
    LockLostError,
    Published,
    Store,
    UnsupportedStoreError,
    View,
)
from distill.core.storage.locations import (
    Location,
    ObjectLocation,
    expand,
    open_read,
    parse_location,
    read_sibling,
    stat,
)

__all__ = ["CacheLockedError", "FileInfo", "Journal", "Location", "Lock", "LockLostError", "ObjectLocation",
           "Published", "Store", "UnsupportedStoreError", "View", "expand", "open_read", "open_store", "parse_location",
           "read_sibling", "stat"]


def open_store(location: str | Path, staging_dir: Path | None = None) -> Store:
    """The store at a local path or an ``s3://`` prefix (`staging_dir`: where files wait before an upload)."""
    if object_store.is_url(location):
        from distill.core.storage.objects import ObjectStore

        return ObjectStore(str(location), staging_dir)
    from distill.core.storage.local import LocalStore

    return LocalStore(Path(location))

"""Which cache directory a reader opens, as a local directory: the named or newest fingerprint under a cache root.

Through the storage layer: a local root gives a held version of the directory (the manifest as it is now, files
by their content-addressed names: core/storage/versions.py); an ``s3://`` root gives a verified local mirror of
the manifest's current version (core/storage/mirror.py). Either way a job that names its version never reads
another one and a refresh never changes or removes files a running job reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from distill.core.storage import Store, View, open_store
from distill.core.storage.versions import hold_version
from distill.teacher_cache.manifest import MANIFEST_NAME, Manifest
from distill.teacher_cache.reader import ERRORS_DIR, CacheError

log = logging.getLogger(__name__)
EXTRA_FILES = ("last_run.json", "cache_config.resolved.yaml")


def _view(store: Store) -> Callable[[], View]:
    """What a reader needs of one fingerprint directory: every listed file and error file (checksum-checked), the
    error files of older builds (no checksum), the run summaries, and last the manifest (snapshot and journal as
    one)."""
    def build() -> View:
        manifest = Manifest.load(store)
        if manifest is None:
            raise FileNotFoundError(f"{store.location}: no manifest; run `distill cache` with that teacher and "
                                    "cache_root")
        shards, snapshot = sorted(manifest.shards.items()), manifest.snapshot()
        return View(version=manifest.version(snapshot),
                    files={e.file: e.file_sha256 for _, e in shards}
                    | {e.errors_file: e.errors_sha256 for _, e in shards if e.errors_file and e.errors_sha256},
                    optional=[f"{ERRORS_DIR}/{stem}.jsonl" for stem, e in shards if e.errors and not e.errors_file]
                    + list(EXTRA_FILES),
                    last={MANIFEST_NAME: json.dumps(snapshot).encode()})  # (indent: the slow encoder)

    return build


def local_view(store: Store, version: str | None = None) -> Path:
    """The fingerprint directory as a local directory (itself, or a verified mirror of `version` / the current)."""
    try:
        return store.view(_view(store), version)
    except OSError as exc:
        raise CacheError(str(exc)) from exc


def cache_dir_here(cache_dir: Path, location: str | None) -> Path:
    """The job's cache directory on this machine: the planning process's directory when this machine sees it,
    else a mirror of the same version (the directory's name) made here from `location`, the fingerprint
    directory's store; a store that has moved on since the job was planned is refused, never read."""
    if location is None or (cache_dir / MANIFEST_NAME).exists():
        return hold_version(cache_dir)
    return local_view(open_store(location), version=cache_dir.name)


def newest_first(root: Store) -> list[str]:
    """Fingerprint directories under a cache root, the most recently written manifest first."""
    found = root.find(f"*/{MANIFEST_NAME}")
    return [name.split("/", 1)[0] for name, _ in sorted(found.items(), key=lambda kv: kv[1], reverse=True)]


def teachers_newest_first(root: Path | str) -> list[tuple[str, dict]]:
    """(fingerprint, teacher info of its manifest) for every cache under a root, newest first."""
    store = open_store(root)
    out = []
    for fp in newest_first(store):
        try:
            out.append((fp, json.loads(store.child(fp).read(MANIFEST_NAME) or b"{}").get("teacher", {})))
        except ValueError:
            log.warning("%s/%s/%s is not valid JSON; skipped", store.location, fp, MANIFEST_NAME)
    if not out:
        raise CacheError(f"{root}: no cache found; run `distill cache` first")
    return out


def find_cache(cache_root: Path | str, fingerprint: str | None = None) -> tuple[Path, str]:
    """(local directory to read, the fingerprint directory's location in its store) of the named fingerprint, or
    of the root itself when it is one, or of the most recently written one. The location is what a worker on
    another machine mirrors the same version from (`cache_dir_here`)."""
    root = open_store(cache_root)
    if fingerprint:
        store = root.child(fingerprint)
        if not store.exists(MANIFEST_NAME):
            raise CacheError(f"{store.location}: no cache for fingerprint {fingerprint}; run `distill cache` with "
                             "that teacher")
    elif root.exists(MANIFEST_NAME):  # the fingerprint directory itself
        store = root
    else:
        names = newest_first(root)
        if not names:
            raise CacheError(f"{cache_root}: no cache found; run `distill cache` first")
        store = root.child(names[0])
    return local_view(store), store.location


def find_cache_dir(cache_root: Path | str, fingerprint: str | None = None) -> Path:
    """The fingerprint directory to read: the named one, or the only / most recently written one.

    An ``s3://`` root is mirrored to a local directory first (only manifest-listed files, checksums verified).
    """
    return find_cache(cache_root, fingerprint)[0]

"""Readers' local copy of an object-store directory: one immutable directory per version (a manifest's hash).

``$DISTILL_MIRROR_DIR/<bucket_prefix>/<fingerprint>/<version>/`` holds the files the version names, each
checked against its SHA-256, then the files readers trust (the manifest) and a ``.complete`` mark, written
last. A directory is never changed once complete, so a refresh that makes a new version never touches files
under a running job, and a job that names its version (in its spec) never reads another one. Files already
mirrored in an older version are hard-linked, not fetched again.

Every process that uses a version holds a shared flock on its ``.in-use`` file until it exits; making a new
version removes older ones that nobody holds (a killed process's flock goes with it): core/storage/versions.py.
Every name is checked to land under the version directory before anything is written there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from distill.core import object_store
from distill.core.atomic_io import atomic_write, checksum_matches, remember_verified
from distill.core.storage.base import View, local_base
from distill.core.storage.names import under
from distill.core.storage.versions import COMPLETE, hold, prune
from distill.core.storage.versions import complete as _complete

log = logging.getLogger(__name__)


class _Replaced(Exception):
    """A named file was gone from the store (a refresh replaced it after we read the manifest)."""


def mirror_base(url: str) -> Path:
    """``$DISTILL_MIRROR_DIR/<parent prefix>/<name>``: a version directory's parent is named like the store's
    last path part (a cache's fingerprint), so a job's mirror path says which fingerprint and version it holds."""
    parent, _, name = url.rpartition("/")
    return local_base("DISTILL_MIRROR_DIR", "~/.cache/distill/mirror", parent) / name


def materialize(url: str, build: Callable[[], View], version: str | None = None) -> Path:
    """The local directory of the store's current state (or of `version`, which must be the current one unless
    it is mirrored here already). A file replaced under us while copying: the state is read again once."""
    base = mirror_base(url)
    if version is not None and _complete(base / version) and _complete(hold(base / version)):
        return base / version
    for last_try in (False, True):
        view = build()
        if version is not None and view.version != version:
            raise FileNotFoundError(
                f"{url}: version {version} of this cache is not mirrored on this machine and the store now "
                f"holds version {view.version} (refreshed since the job was planned); re-run the job")
        target = hold(base / view.version)
        if not _complete(target):
            try:
                _copy(url, view, target, last_try)
            except _Replaced:
                continue
        prune(base, keep=target)
        return target
    raise AssertionError("unreachable")  # pragma: no cover


def _copies(base: Path, exclude: Path) -> dict[str, Path]:
    """Files of other complete versions, by name (content-addressed names: same name, same bytes)."""
    found: dict[str, Path] = {}
    for d in sorted(base.glob("*/" + COMPLETE), key=lambda p: p.stat().st_mtime_ns):
        if d.parent != exclude:
            for p in d.parent.iterdir():
                if p.is_file() and not p.name.startswith("."):
                    found[p.name] = p
    return found


def _copy(url: str, view: View, target: Path, last_try: bool) -> None:
    (target / "errors").mkdir(parents=True, exist_ok=True)
    older = _copies(target.parent, exclude=target)
    fetched = linked = 0
    for name, sha in sorted(view.files.items()):
        dest = under(target, name, url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and checksum_matches(dest, sha):
            continue
        if name in older and checksum_matches(older[name], sha):
            atomic_write(dest, partial(os.link, older[name]))
            remember_verified(dest, sha)
            linked += 1
            continue
        data = object_store.get_bytes(object_store.join(url, name))
        if data is None and not last_try:
            raise _Replaced(name)
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"{object_store.join(url, name)}: missing or not the file the manifest lists "
                          "(checksum); re-run `distill cache` over that shard")
        atomic_write(dest, data)
        remember_verified(dest, sha)
        fetched += 1
    for name in view.optional:
        dest = under(target, name, url)
        if (data := object_store.get_bytes(object_store.join(url, name))) is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data)
    for name, data in view.last.items():
        atomic_write(under(target, name, url), data)
    atomic_write(target / COMPLETE, view.version.encode())
    log.info("mirrored %s version %s to %s (%d file(s) fetched, %d linked, %d already there)", url,
             view.version, target, fetched, linked, len(view.files) - fetched - linked)

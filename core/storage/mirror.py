"""Readers' local copy of an object-store directory: one immutable directory per version (a manifest's hash).

``$DISTILL_MIRROR_DIR/<bucket_prefix>/<fingerprint>/<version>/`` holds the files the version names, each
checked against its SHA-256, then the files readers trust (the manifest) and a ``.complete`` mark, written
last. A directory is never changed once complete, so a refresh that makes a new version never touches files
under a running job, and a job that names its version (in its spec) never reads another one. Files already
mirrored in an older version are hard-linked, not fetched again.

Every process that uses a version holds a shared flock on its ``.in-use`` file until it exits; making a new
version removes older ones that nobody holds (a killed process's flock goes with it).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from distill.core import object_store
from distill.core.atomic_io import atomic_write, checksum_matches, remember_verified
from distill.core.storage.base import View, local_base

log = logging.getLogger(__name__)
COMPLETE = ".complete"
IN_USE = ".in-use"
_HELD: dict[str, int] = {}  # version directory -> fd of its shared flock, for this process's lifetime


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
    if version is not None and _complete(base / version) and _complete(_hold(base / version)):
        return base / version
    for last_try in (False, True):
        view = build()
        if version is not None and view.version != version:
            raise FileNotFoundError(
                f"{url}: version {version} of this cache is not mirrored on this machine and the store now "
                f"holds version {view.version} (refreshed since the job was planned); re-run the job")
        target = _hold(base / view.version)
        if not _complete(target):
            try:
                _copy(url, view, target, last_try)
            except _Replaced:
                continue
        _prune(base, keep=target)
        return target
    raise AssertionError("unreachable")  # pragma: no cover


def _complete(directory: Path) -> bool:
    return (directory / COMPLETE).exists()


def _hold(directory: Path) -> Path:
    """Mark a version directory in use by this process: a shared flock on its `.in-use` file, kept until the
    process ends. Taken before the directory is filled, so nobody prunes it under us."""
    if str(directory) in _HELD:
        return directory
    for _ in range(5):
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(directory / IN_USE).st_ino
        except FileNotFoundError:
            same = False  # pruned between our open and our flock: make it again
        if same:
            _HELD[str(directory)] = fd
            return directory
        os.close(fd)
    raise OSError(f"{directory}: removed every time we opened it (another process prunes this mirror)")


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
        dest = target / name
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
        if (data := object_store.get_bytes(object_store.join(url, name))) is not None:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target / name, data)
    for name, data in view.last.items():
        atomic_write(target / name, data)
    atomic_write(target / COMPLETE, view.version.encode())
    log.info("mirrored %s version %s to %s (%d file(s) fetched, %d linked, %d already there)", url,
             view.version, target, fetched, linked, len(view.files) - fetched - linked)


def _prune(base: Path, keep: Path) -> None:
    """Remove other versions that no process holds (their flock can be taken exclusively)."""
    for d in [p for p in base.iterdir() if p.is_dir()]:
        if d == keep or str(d) in _HELD:
            continue
        try:
            fd = os.open(d / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running job reads it
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed mirror version %s (no process uses it)", d)
        finally:
            os.close(fd)
